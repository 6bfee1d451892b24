//! Fleet membership over MQTT: signed model updates pulled from retained topics, reports,
//! telemetry and inference requests. The broker is the only server; see `core/proto/SPEC.md`.
//!
//! Layers: [`plan`] decides (pure), [`tern_update`] verifies and installs (files), [`validate`]
//! runs a candidate, `agent` drives them from MQTT events, and the repository hot-swaps.

mod agent;
mod infer;
pub mod plan;
pub mod topics;
pub use tern_update::validate;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use agent::start;
pub use topics::Topics;

/// Why fleet membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid MQTT URL `{0}`: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")]
    Url(String),
    #[error("MQTT over TLS: {0}")]
    Tls(String),
    #[error("invalid {what} `{value}`: use 1 to 32 letters, digits, `_`, `-`, `.`")]
    Id { what: &'static str, value: String },
    #[error(
        "no trusted keys: signed manifests are required; give --trust-key FILE (from `tern keygen`)"
    )]
    NoTrustedKeys,
    #[error(transparent)]
    Keys(#[from] tern_update::UpdateError),
}

/// Where the broker is, from `mqtt://HOST[:PORT]` (also `tcp://`, or a bare `HOST:PORT`;
/// port 1883) or `mqtts://HOST[:PORT]` (also `ssl://`; TLS, port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

pub fn parse_url(url: &str) -> Result<BrokerUrl, FleetError> {
    let (rest, tls) = if let Some(r) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (r, true)
    } else {
        let r = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        (r, false)
    };
    let rest = rest.trim_end_matches('/');
    let bad = || FleetError::Url(url.into());
    if rest.is_empty() || rest.contains('/') || rest.contains("://") {
        return Err(bad());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => (host, port.parse().map_err(|_| bad())?),
        Some(_) => return Err(bad()),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    Ok(BrokerUrl {
        host: host.into(),
        port,
        tls,
    })
}

/// Who this client is to the broker. Over `mqtts://` the broker is checked against `ca_file`
/// (the system's roots when absent); a client certificate is the device's credential where
/// the broker maps identities to users (Mosquitto's `use_identity_as_username`), and a
/// username/password pair works with or without TLS.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerAuth<'a> {
    pub ca_file: Option<&'a Path>,
    pub client_cert: Option<&'a Path>,
    pub client_key: Option<&'a Path>,
    pub credentials: Option<(&'a str, &'a str)>,
}

impl<'a> BrokerAuth<'a> {
    /// The broker settings of a fleet membership.
    pub fn of(cfg: &'a crate::config::Fleet) -> BrokerAuth<'a> {
        BrokerAuth {
            ca_file: cfg.ca_file.as_deref(),
            client_cert: cfg.client_cert.as_deref(),
            client_key: cfg.client_key.as_deref(),
            credentials: cfg.username.as_deref().zip(cfg.password.as_deref()),
        }
    }
}

/// MQTT 5 options for Tern's clients: persistent session when `persistent`, a packet limit
/// large enough for chunks (rumqttc's default of 10 KiB is not), TLS for `mqtts://`.
pub fn mqtt_options(
    url: &str,
    client_id: &str,
    max_packet_bytes: u32,
    persistent: bool,
    auth: &BrokerAuth<'_>,
) -> Result<MqttOptions, FleetError> {
    let broker = parse_url(url)?;
    let mut o = MqttOptions::new(client_id, broker.host, broker.port);
    o.set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(Some(max_packet_bytes))
        .set_connection_timeout(5);
    if persistent {
        // Both are needed for the broker to keep the session across reconnects.
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(7 * 24 * 3600));
    }
    if let Some((user, password)) = auth.credentials {
        o.set_credentials(user, password);
    }
    if broker.tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls_config(auth)?)));
    } else if auth.ca_file.is_some() || auth.client_cert.is_some() {
        // Certificates with a plain URL would silently go unused.
        return Err(FleetError::Tls(format!(
            "certificates are configured but `{url}` is not an mqtts:// URL"
        )));
    }
    Ok(o)
}

fn tls_config(auth: &BrokerAuth<'_>) -> Result<Arc<rustls::ClientConfig>, FleetError> {
    let tls = |m: String| FleetError::Tls(m);
    let certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, FleetError> {
        let certs = CertificateDer::pem_file_iter(p)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| tls(format!("reading certificates from {}: {e}", p.display())))?;
        if certs.is_empty() {
            return Err(tls(format!("no certificate in {}", p.display())));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    match auth.ca_file {
        Some(p) => {
            for c in certs(p)? {
                roots
                    .add(c)
                    .map_err(|e| tls(format!("CA certificate in {}: {e}", p.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(tls(
                    "no CA file configured and no system root certificates found".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (auth.client_cert, auth.client_key) {
        (Some(c), Some(k)) => {
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| tls(format!("reading the private key {}: {e}", k.display())))?;
            builder
                .with_client_auth_cert(certs(c)?, key)
                .map_err(|e| tls(format!("client certificate {}: {e}", c.display())))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(tls(
                "a client certificate and its key are configured together".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_a_default_port() {
        let at = |host: &str, port, tls| BrokerUrl {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            at("127.0.0.1", 1884, false)
        );
        assert_eq!(
            parse_url("mqtt://broker").unwrap(),
            at("broker", 1883, false)
        );
        assert_eq!(parse_url("localhost:9").unwrap(), at("localhost", 9, false));
        assert_eq!(
            parse_url("mqtts://broker").unwrap(),
            at("broker", 8883, true)
        );
        assert_eq!(parse_url("ssl://b:1").unwrap(), at("b", 1, true));
        for bad in [
            "",
            "mqtt://",
            "mqtt://h:x",
            "http://h/x",
            "mqtt://:1",
            "mqtts://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused_with_the_reason() {
        let ca = Path::new("/nonexistent/ca.pem");
        let with_ca = BrokerAuth {
            ca_file: Some(ca),
            ..Default::default()
        };
        let err = |url: &str, auth: &BrokerAuth<'_>| {
            mqtt_options(url, "t", 1024, false, auth)
                .unwrap_err()
                .to_string()
        };
        let e = err("mqtt://h", &with_ca);
        assert!(e.contains("not an mqtts:// URL"), "{e}");
        let e = err("mqtts://h", &with_ca);
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let half = BrokerAuth {
            client_cert: Some(ca),
            ..Default::default()
        };
        let e = err("mqtts://h", &half);
        assert!(
            e.contains("together") || e.contains("no system root"),
            "{e}"
        );
    }
}
