//! Why a command of the program failed: one message that says what it was doing and why, such
//! as `router.toml: endpoints[0] (`az`): api_key_env: $AZURE_KEY is not set`.

use std::fmt;

/// A failure of the program (loading a configuration, starting the server, the demo), as the
/// operator reads it.
#[derive(Debug)]
pub(crate) struct Problem(String);

impl Problem {
    /// A problem described by `message`.
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Problem {}

impl From<router_facade::Error> for Problem {
    fn from(error: router_facade::Error) -> Self {
        Self(error.to_string())
    }
}

impl From<std::io::Error> for Problem {
    fn from(error: std::io::Error) -> Self {
        Self(error.to_string())
    }
}

/// Says what was being done when a result failed: `context: cause`.
pub(crate) trait Context<T> {
    fn context(self, context: impl fmt::Display) -> Result<T, Problem>;
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T, Problem>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T, Problem> {
        self.map_err(|e| Problem(format!("{context}: {e}")))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T, Problem> {
        self.map_err(|e| Problem(format!("{}: {e}", context())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T, Problem> {
        self.ok_or_else(|| Problem(context.to_string()))
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T, Problem> {
        self.ok_or_else(|| Problem(context().to_string()))
    }
}

/// Returns early with a [`Problem`].
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::problem::Problem::new(format!($($arg)*)))
    };
}
pub(crate) use bail;
