//! Everything about bytes on the wire: the length-prefixed frame, the MessagePack
//! request/response envelopes, and the stable error codes.
//!
//! Nothing here knows what an op means; the server hands a decoded [`Request`] to a
//! handler and writes back whatever [`Response`] it gets.

mod error;
mod frame;
mod message;
pub mod msgpack;

pub use error::{ErrorCode, OpError};
pub use frame::{FrameCodec, FrameError, encode_frame};
pub use message::{Request, RequestError, Response, encode_result};

/// The protocol version `hello` negotiates. Bumped only for a breaking change; new ops
/// and new optional fields are added without bumping it (see protocol.md).
pub const PROTOCOL_VERSION: u64 = 1;
