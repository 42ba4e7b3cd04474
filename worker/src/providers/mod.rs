//! Provider implementations and the registry the interpreter looks them up in.

pub mod test;

use std::collections::HashMap;
use std::sync::Arc;

use provisio_shared::provider::Provider;

#[derive(Default, Clone)]
pub struct Registry {
    providers: HashMap<String, Arc<dyn Provider>>,
}

impl Registry {
    pub fn register(&mut self, p: Arc<dyn Provider>) {
        self.providers.insert(p.name().to_owned(), p);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }
}
