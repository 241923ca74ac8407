//! Optional TLS (rustls with the ring provider) for node connections.
//!
//! Node: a certificate chain and key in PEM files (`--certfile/--keyfile`). Client: either a CA
//! bundle (the node's certificate must chain to it and name the address dialled), or a pinned
//! certificate (exactly that certificate is accepted, whatever the address — dispy's own
//! model, where clients trust the node's self-signed cert file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {detail}")]
    Certs { path: PathBuf, detail: String },
    #[error("cannot read a private key from {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Certs {
            path: path.into(),
            detail: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError::Certs {
        path: path.into(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Certs {
            path: path.into(),
            detail: "no PEM CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The node's TLS configuration. The key may be in the cert file (as dispy allows).
pub fn server_config(
    certfile: &Path,
    keyfile: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(certfile)?;
    let keypath = keyfile.unwrap_or(certfile);
    let key = PrivateKeyDer::from_pem_file(keypath).map_err(|e| TlsError::Key {
        path: keypath.into(),
        detail: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// What a client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates that must sign the node's chain; the node must be named by the address.
    CaFile(PathBuf),
    /// Exactly this certificate (the first in the file) is accepted.
    PinnedCert(PathBuf),
    /// Exactly this certificate (the first in this PEM text) is accepted; `source` names where
    /// the text came from, for errors.
    PinnedPem { pem: Vec<u8>, source: String },
}

pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match trust {
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Certs {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::PinnedCert(path) => pinned(builder, load_certs(path)?.remove(0)),
        Trust::PinnedPem { pem, source } => {
            let first = CertificateDer::pem_slice_iter(pem).next();
            let cert = match first {
                Some(Ok(cert)) => cert,
                Some(Err(e)) => {
                    return Err(TlsError::Certs {
                        path: source.into(),
                        detail: e.to_string(),
                    })
                }
                None => {
                    return Err(TlsError::Certs {
                        path: source.into(),
                        detail: "no PEM CERTIFICATE block found".into(),
                    })
                }
            };
            pinned(builder, cert)
        }
    };
    Ok(Arc::new(config))
}

fn pinned(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>,
    pinned: CertificateDer<'static>,
) -> rustls::ClientConfig {
    builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert {
            pinned,
            provider: provider(),
        }))
        .with_no_client_auth()
}

/// The name a client presents for `host` (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("invalid TLS server name {host:?}: {e}"))
}

#[derive(Debug)]
struct PinnedCert {
    pinned: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.pinned.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node's certificate is not the pinned certificate".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
