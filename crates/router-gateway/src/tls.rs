//! HTTPS on the listener: the certificate and key from `[server.tls]`, read at start and
//! again on SIGHUP (a renewed certificate is served to new connections without a restart; a
//! file that does not load leaves the old one in place).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use crate::config::TlsConfig;
use crate::problem::{Context as _, Problem, bail};

/// The listener's TLS settings, swapped whole on reload.
#[derive(Debug)]
pub(crate) struct Tls {
    current: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Reads the files `config` names.
    pub(crate) fn load(config: &TlsConfig) -> Result<Self, Problem> {
        Ok(Self {
            current: ArcSwap::from_pointee(server_config(config)?),
        })
    }

    /// Reads the files again, for [`Tls::install`]: on an error the certificate served so
    /// far stays.
    pub(crate) fn reread(config: &TlsConfig) -> Result<Arc<ServerConfig>, Problem> {
        server_config(config).map(Arc::new)
    }

    /// Serves `next` to connections accepted from now on.
    pub(crate) fn install(&self, next: Arc<ServerConfig>) {
        self.current.store(next);
    }

    /// An acceptor with the certificate current now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

fn server_config(config: &TlsConfig) -> Result<ServerConfig, Problem> {
    let cert_path = config.cert_file.display();
    let key_path = config.key_file.display();
    let chain = CertificateDer::pem_file_iter(&config.cert_file)
        .with_context(|| format!("server.tls.cert_file: cannot read {cert_path}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert_file: {cert_path} is not PEM"))?;
    if chain.is_empty() {
        bail!("server.tls.cert_file: {cert_path} holds no CERTIFICATE block");
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file).with_context(|| {
        format!("server.tls.key_file: no private key could be read from {key_path}")
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("server.tls: the TLS library has no protocol version to offer")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!("server.tls: the key in {key_path} does not fit the certificate in {cert_path}")
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server)
}
