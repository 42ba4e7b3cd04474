//! The API's body checks without a server, database or broker: what a route answers for a
//! body before it looks anything up. They exist for the property tests
//! (queue-manager/tests/fuzz_api.rs), which throw thousands of malformed bodies at them; the
//! handlers run the very same functions.

use provisio_shared::procedure::{Catalog, NoExternal};
use serde_json::Value;

use super::ApiError;

/// `POST /v1/requests` (or, with `trusted`, `POST /v1/requests/trusted`) by a caller with
/// every permission; `Ok` when the body would go on to the namespace lookup.
pub fn check_submit_body(bytes: &[u8], trusted: bool) -> Result<(), ApiError> {
    super::requests::check_body(bytes, trusted)
}

/// `POST /v1/requests:batch`: the whole body refused, or one answer per element.
pub fn check_batch_body(bytes: &[u8]) -> Result<Vec<Result<(), ApiError>>, ApiError> {
    super::requests::check_batch_body(bytes)
}

/// `PUT /v1/namespaces/{name}` with a body of at most `limit` bytes, compiled against
/// `catalog` with no other namespace known; the document on success.
pub fn check_namespace_body(
    name: &str,
    bytes: &[u8],
    limit: usize,
    catalog: &dyn Catalog,
) -> Result<Value, ApiError> {
    let (doc, _) = super::namespaces::read_document(name, bytes, limit)?;
    super::namespaces::compile_document(&doc, catalog, &NoExternal)?;
    Ok(doc)
}
