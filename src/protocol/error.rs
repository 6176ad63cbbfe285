use std::fmt;

/// The stable error codes of the wire contract. Each concern's error enum maps onto
/// exactly one of these; protocol.md lists them with whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    TooLarge,
    Unavailable,
    Timeout,
    Forbidden,
    ShuttingDown,
    Internal,
    InvalidMail,
    NotFound,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::UnknownOp => "UNKNOWN_OP",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::InvalidMail => "INVALID_MAIL",
            ErrorCode::NotFound => "NOT_FOUND",
        }
    }

    /// Parses a wire code; clients use this to turn an error frame back into a type.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        Some(match code {
            "BAD_REQUEST" => ErrorCode::BadRequest,
            "UNKNOWN_OP" => ErrorCode::UnknownOp,
            "TOO_LARGE" => ErrorCode::TooLarge,
            "UNAVAILABLE" => ErrorCode::Unavailable,
            "TIMEOUT" => ErrorCode::Timeout,
            "FORBIDDEN" => ErrorCode::Forbidden,
            "SHUTTING_DOWN" => ErrorCode::ShuttingDown,
            "INTERNAL" => ErrorCode::Internal,
            "INVALID_MAIL" => ErrorCode::InvalidMail,
            "NOT_FOUND" => ErrorCode::NotFound,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it goes on the wire: a code, a human message, and the optional extra
/// fields the contract names (`retry_after_ms`, `field`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
    /// For `UNAVAILABLE` (and other retryable errors): when a retry may succeed.
    pub retry_after_ms: Option<u64>,
    /// For `BAD_REQUEST`, `TOO_LARGE` and `INVALID_MAIL`: the request field at fault.
    pub field: Option<String>,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            retry_after_ms: None,
            field: None,
        }
    }

    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        OpError::new(ErrorCode::BadRequest, message).with_field(field)
    }

    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }

    pub fn with_retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for OpError {}
