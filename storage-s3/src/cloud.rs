//! Builders of the HTTP-backed stores (S3, GCS, Azure), behind their cargo features.

use std::sync::Arc;

use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use url::Url;

use crate::config::StorageConfig;
use crate::error::{Error, Result};

fn retry_config(config: &StorageConfig) -> RetryConfig {
    let r = &config.retry;
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: r.init_backoff,
            max_backoff: r.max_backoff,
            base: r.backoff_base,
        },
        max_retries: r.max_retries,
        retry_timeout: r.retry_timeout,
    }
}

/// Timeouts as client config keys, so that client options read from the environment stay.
fn client_settings(config: &StorageConfig) -> [(ClientConfigKey, String); 2] {
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
    [
        (
            ClientConfigKey::ConnectTimeout,
            ms(config.http.connect_timeout),
        ),
        (ClientConfigKey::Timeout, ms(config.http.request_timeout)),
    ]
}

fn build_error(shown: &str, source: object_store::Error) -> Error {
    Error::Build {
        url: shown.to_owned(),
        source: Box::new(source),
    }
}

/// Builds an S3 client for `s3://bucket/...`.
#[cfg(feature = "s3")]
pub(crate) fn build_s3(
    url: &Url,
    config: &StorageConfig,
    shown: &str,
) -> Result<Arc<dyn ObjectStore>> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| Error::InvalidUrl {
            url: shown.to_owned(),
            reason: "no bucket: use s3://bucket/prefix".into(),
        })?;
    let s3 = &config.s3;
    let mut builder = if s3.from_env.unwrap_or(true) {
        AmazonS3Builder::from_env()
    } else {
        AmazonS3Builder::new()
    };
    builder = builder
        .with_bucket_name(bucket)
        .with_retry(retry_config(config));
    for (key, value) in client_settings(config) {
        builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
    }
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &s3.access_key_id {
        builder = builder.with_access_key_id(key.expose());
    }
    if let Some(secret) = &s3.secret_access_key {
        builder = builder.with_secret_access_key(secret.expose());
    }
    if let Some(token) = &s3.session_token {
        builder = builder.with_token(token.expose());
    }
    if let Some(allow) = s3.allow_http {
        builder = builder.with_allow_http(allow);
    }
    if let Some(virtual_hosted) = s3.virtual_hosted_style {
        builder = builder.with_virtual_hosted_style_request(virtual_hosted);
    }
    // A plain-http endpoint (a local server) is refused by every request later, with an error
    // that does not say why: say it now, naming the setting.
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let allow_http = builder
        .get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if let Some(endpoint) = endpoint.filter(|e| e.starts_with("http://")) {
        if !allow_http {
            return Err(Error::InvalidConfig {
                url: shown.to_owned(),
                field: "s3.allow-http",
                reason: format!(
                    "is off but the endpoint {endpoint} is plain http://: set s3.allow-http = \
                     true (or AWS_ALLOW_HTTP=true) for a local server, or use https://"
                ),
            });
        }
    }
    let store = builder.build().map_err(|e| build_error(shown, e))?;
    Ok(Arc::new(store))
}

/// Builds a GCS client for `gs://bucket/...`.
#[cfg(feature = "gcp")]
pub(crate) fn build_gcs(
    url: &Url,
    config: &StorageConfig,
    shown: &str,
) -> Result<Arc<dyn ObjectStore>> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_url(url.as_str())
        .with_retry(retry_config(config));
    for (key, value) in client_settings(config) {
        builder = builder.with_config(GoogleConfigKey::Client(key), value);
    }
    let store = builder.build().map_err(|e| build_error(shown, e))?;
    Ok(Arc::new(store))
}

/// Builds an Azure client for `az://container/...` and the other Azure URL forms; returns the
/// store and the root prefix.
#[cfg(feature = "azure")]
pub(crate) fn build_azure(
    url: &Url,
    config: &StorageConfig,
    shown: &str,
) -> Result<(Arc<dyn ObjectStore>, object_store::path::Path)> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};

    let (_, root) = object_store::ObjectStoreScheme::parse(url).map_err(|e| Error::InvalidUrl {
        url: shown.to_owned(),
        reason: e.to_string(),
    })?;
    let root = if root.as_ref().is_empty() {
        root
    } else {
        crate::paths::relative_path(root.as_ref())?
    };
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_url(url.as_str())
        .with_retry(retry_config(config));
    for (key, value) in client_settings(config) {
        builder = builder.with_config(AzureConfigKey::Client(key), value);
    }
    let store = builder.build().map_err(|e| build_error(shown, e))?;
    Ok((Arc::new(store), root))
}

#[cfg(all(test, feature = "s3"))]
mod tests {
    use super::*;

    fn config(endpoint: &str, allow_http: Option<bool>) -> StorageConfig {
        let mut c = StorageConfig::new("s3://bucket/prefix");
        c.s3.from_env = Some(false);
        c.s3.endpoint = Some(endpoint.to_string());
        c.s3.region = Some("us-east-1".into());
        c.s3.allow_http = allow_http;
        c
    }

    #[test]
    fn a_plain_http_endpoint_without_allow_http_is_refused_by_name() {
        let url = Url::parse("s3://bucket/prefix").expect("a URL");
        let Err(err) = build_s3(
            &url,
            &config("http://127.0.0.1:8333", None),
            "s3://bucket/prefix",
        ) else {
            panic!("a plain http endpoint without allow-http was accepted");
        };
        let err = err.to_string();
        assert!(
            err.contains("s3.allow-http") && err.contains("http://127.0.0.1:8333"),
            "{err}"
        );
        let off = build_s3(
            &url,
            &config("http://127.0.0.1:8333", Some(false)),
            "s3://bucket/prefix",
        );
        assert!(off.is_err());
        for (endpoint, allow) in [
            ("http://127.0.0.1:8333", Some(true)),
            ("https://s3.example.com", None),
        ] {
            assert!(
                build_s3(&url, &config(endpoint, allow), "s3://bucket/prefix").is_ok(),
                "{endpoint}"
            );
        }
    }
}
