//! Domain types. Each is parsed once at the edge (HTTP body, AMQP delivery, database row) so
//! that code further in never sees an invalid value.

mod envelope;
mod names;
mod request_id;
mod status;

pub use envelope::{Envelope, EnvelopeError, PrincipalRef, RequestKind, RetryPolicy};
pub use names::{Name, NameError};
pub use request_id::{RequestId, RequestIdError};
pub use status::{OnExhausted, Permission, Priority, Status, TxModel, TxStatus, UnknownVariant};
