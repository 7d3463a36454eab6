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
