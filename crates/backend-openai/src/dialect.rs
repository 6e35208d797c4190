//! Where the dialects of the OpenAI wire differ: URLs and fixed headers.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};
use router_core::Error;
use url::Url;

/// An operation of the API.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /chat/completions`.
    Chat,
    /// `POST /embeddings`.
    Embeddings,
    /// `POST /completions` (legacy).
    Completions,
    /// `POST /responses` (the Responses API).
    Responses,
}

impl Operation {
    /// The path below the API's base, without a leading slash.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Embeddings => "embeddings",
            Self::Completions => "completions",
            Self::Responses => "responses",
        }
    }
}

/// A dialect of the OpenAI wire protocol. Synchronous and object safe.
pub trait Dialect: Send + Sync + fmt::Debug {
    /// The URL for `operation` when the request's model is `model` (for Azure's deployment
    /// URLs, the deployment).
    fn url(&self, operation: Operation, model: &str) -> Result<Url, Error>;

    /// Headers sent with every request besides the credential.
    fn headers(&self) -> &HeaderMap;

    /// Whether the upstream can spill a request over to another deployment
    /// (`x-ms-spillover-deployment`, Azure's). `false` by default.
    fn spills_over(&self) -> bool {
        false
    }
}

/// OpenAI, or any server that speaks its API under a base URL such as
/// `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
#[derive(Debug, Clone)]
pub struct OpenAiDialect {
    base: Url,
    headers: HeaderMap,
}

impl OpenAiDialect {
    /// The dialect for `base_url`, which must be an `http` or `https` URL.
    pub fn new(base_url: &str) -> Result<Self, Error> {
        Ok(Self {
            base: base_url_with_slash(base_url, "base_url")?,
            headers: HeaderMap::new(),
        })
    }

    /// Sends `OpenAI-Organization: <organization>`.
    pub fn set_organization(&mut self, organization: &str) -> Result<(), Error> {
        self.set_header("openai-organization", organization)
    }

    /// Sends `OpenAI-Project: <project>`.
    pub fn set_project(&mut self, project: &str) -> Result<(), Error> {
        self.set_header("openai-project", project)
    }

    fn set_header(&mut self, name: &'static str, value: &str) -> Result<(), Error> {
        let value = HeaderValue::from_str(value)
            .map_err(|_| Error::config(format!("{name}: not a valid header value")))?;
        self.headers.insert(HeaderName::from_static(name), value);
        Ok(())
    }
}

impl Dialect for OpenAiDialect {
    fn url(&self, operation: Operation, _model: &str) -> Result<Url, Error> {
        self.base.join(operation.path()).map_err(|e| {
            Error::config(format!("base_url: cannot append {}: {e}", operation.path()))
        })
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// Parses a configured base URL and makes its path end with `/`, so that joining a relative
/// path appends to it. `field` names the setting in errors.
///
/// # Errors
///
/// A [`Config`](router_core::ErrorKind::Config) error naming `field` when the URL does not
/// parse, is not `http`/`https`, carries credentials, a query or a fragment.
pub fn base_url_with_slash(value: &str, field: &str) -> Result<Url, Error> {
    let mut url = Url::parse(value.trim())
        .map_err(|e| Error::config(format!("{field}: `{value}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::config(format!(
            "{field}: `{value}` must use http or https, not {}",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::config(format!(
            "{field}: credentials in the URL are not allowed; configure the key instead"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::config(format!(
            "{field}: `{value}` must not have a query or a fragment"
        )));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_urls_honour_the_base_path() {
        for base in ["https://api.openai.com/v1", "https://api.openai.com/v1/"] {
            let dialect = OpenAiDialect::new(base).unwrap();
            assert_eq!(
                dialect.url(Operation::Chat, "m").unwrap().as_str(),
                "https://api.openai.com/v1/chat/completions"
            );
        }
        let local = OpenAiDialect::new("http://127.0.0.1:8000/proxy/openai/v1").unwrap();
        assert_eq!(
            local.url(Operation::Embeddings, "m").unwrap().as_str(),
            "http://127.0.0.1:8000/proxy/openai/v1/embeddings"
        );
    }

    #[test]
    fn bad_base_urls_name_the_field() {
        for bad in [
            "api.openai.com/v1",
            "ftp://x/v1",
            "https://user:pw@x/v1",
            "https://x/v1?a=1",
        ] {
            let error = OpenAiDialect::new(bad).unwrap_err();
            assert!(error.to_string().contains("base_url"), "{error}");
            assert!(
                !error.to_string().contains("pw@"),
                "no credentials echoed: {error}"
            );
        }
    }
}
