//! Objects in an object store as storage, through the `object_store`
//! crate: `s3://BUCKET/KEY` (Amazon S3 and what speaks its protocol, such
//! as Ceph's radosgw), `gs://BUCKET/KEY` (Google Cloud Storage) and
//! `az://CONTAINER/KEY` (Azure Blob Storage). QEMU has no such driver; the
//! names and options are oxqcow's own.
//!
//! Where the store is, and the credentials, come from the environment as
//! each store's own tools read it (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_ALLOW_HTTP`, ...; `GOOGLE_*`; `AZURE_*`), and from options
//! ([`ObjectOptions::apply`]) that override it.
//!
//! Reading ([`ObjectStorage`]): a HEAD request for the length and the
//! ETag, then range GETs pinned to that ETag (`If-Match`, the answer's
//! ETag and range checked too), so an object replaced while it is read
//! fails the read instead of mixing two versions of it; readahead and
//! parallel ranges as the HTTP backend reads (`ranged.rs`).
//!
//! Writing: objects cannot be rewritten in place, so [`ObjectStorage`]
//! refuses writes; a new object is written front to back while a
//! `convert` makes it (`object_writer.rs`).
//!
//! `object_store` is asynchronous: each open object owns a small tokio
//! runtime and the synchronous calls block on it.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig};

use super::ranged::{RangeFetch, RangedReader};
use super::Storage;

/// The URL schemes (and so the drivers) of the stores oxqcow opens.
pub const SCHEMES: &[&str] = &["s3", "gs", "az"];
/// The default readahead of small reads: object stores answer each
/// request slowly, so more than the curl driver's 256 KiB pays.
pub const DEFAULT_READAHEAD: u64 = 1 << 20;
/// Seconds one request may take by default.
pub const DEFAULT_TIMEOUT: u64 = 30;
/// Reads at least this long go as parallel range requests of at least
/// this size: larger than the HTTP backend's, as each request to an
/// object store costs more, and `convert`'s workers (2 MiB reads) are
/// parallel already.
const PIECE: usize = 4 << 20;
/// Seconds connecting may take.
const CONNECT_TIMEOUT: u64 = 5;
/// How often a request that failed on the way (connection refused or
/// reset, timeout, 5xx) is tried again: a few, so that a server that is
/// gone fails the command within seconds rather than minutes.
const RETRIES: usize = 2;

/// The refusal of writes to an object.
pub const NO_WRITES: &str =
    "objects in an object store cannot be rewritten in place; only 'convert' writes one, as a new object";

/// Where an object is and how it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectOptions {
    /// `s3://BUCKET/KEY`, `gs://BUCKET/KEY` or `az://CONTAINER/KEY`.
    pub url: Option<String>,
    /// Bytes read beyond a small read, for the reads that follow.
    pub readahead: u64,
    /// Seconds one request may take; `None`: what the environment says
    /// (`AWS_TIMEOUT`, ...), else [`DEFAULT_TIMEOUT`].
    pub timeout: Option<u64>,
    /// The store's own configuration keys (`endpoint`, `region`,
    /// `access_key_id`, `allow_http`, ... as `object_store` names them),
    /// over what the environment says.
    pub config: Vec<(String, String)>,
}

impl Default for ObjectOptions {
    fn default() -> ObjectOptions {
        ObjectOptions { url: None, readahead: DEFAULT_READAHEAD, timeout: None, config: Vec::new() }
    }
}

impl ObjectOptions {
    /// The options an image name opens (`s3://bucket/key`, ...).
    pub fn from_url(url: &str) -> ObjectOptions {
        ObjectOptions { url: Some(url.to_string()), ..ObjectOptions::default() }
    }

    /// Applies one option given as text: `url`, `readahead`, `timeout`,
    /// else one of the store's configuration keys (checked when the store
    /// is opened, which knows which store it is).
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "url" => self.url = Some(value.to_string()),
            "readahead" => self.readahead = crate::qemu_syntax::parse_size_option(key, value)?,
            "timeout" => match crate::qemu_syntax::parse_number_option(key, value)? {
                0 => return Err("Parameter 'timeout' must be at least 1 (second)".into()),
                seconds => self.timeout = Some(seconds),
            },
            _ => self.config.push((key.to_string(), value.to_string())),
        }
        Ok(())
    }

    /// The scheme, the bucket and the key the URL names.
    fn location(&self) -> Result<(&str, &str, &str), String> {
        let Some(url) = self.url.as_deref() else {
            return Err("an object store driver requires a 'url' option".into());
        };
        let parsed = url.split_once("://").and_then(|(scheme, rest)| {
            let (bucket, key) = rest.split_once('/')?;
            Some((scheme, bucket, key))
        });
        match parsed {
            Some((scheme, bucket, key)) if SCHEMES.contains(&scheme) && !bucket.is_empty() && !key.is_empty() => {
                Ok((scheme, bucket, key))
            }
            _ => Err(format!(
                "'{url}' does not name an object: expected s3://BUCKET/KEY, gs://BUCKET/KEY or az://CONTAINER/KEY"
            )),
        }
    }
}

/// One object, with the runtime its requests run on.
pub(crate) struct Remote {
    pub(crate) runtime: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    /// The same store, for uploads whose parts are numbered by the caller.
    pub(crate) multipart: Arc<dyn MultipartStore>,
    pub(crate) path: ObjectPath,
    pub(crate) url: String,
    pub(crate) scheme: &'static str,
}

/// Builds a store of `$builder`'s kind from the environment, the URL and
/// the options, with oxqcow's timeouts and retries.
macro_rules! build_store {
    ($builder:ty, $key:ty, $scheme:expr, $url:expr, $opts:expr, $retry:expr) => {{
        let mut builder = <$builder>::from_env().with_url($url).with_retry($retry);
        let timeout_key = "timeout".parse::<$key>().map_err(|e| e.to_string())?;
        let timeout = match $opts.timeout {
            Some(seconds) => Some(seconds),
            None if builder.get_config_value(&timeout_key).is_none() => Some(DEFAULT_TIMEOUT),
            None => None,
        };
        if let Some(seconds) = timeout {
            builder = builder.with_config(timeout_key, format!("{seconds}s"));
        }
        builder = builder
            .with_config("connect_timeout".parse::<$key>().map_err(|e| e.to_string())?, format!("{CONNECT_TIMEOUT}s"));
        for (k, v) in &$opts.config {
            let key = k
                .parse::<$key>()
                .map_err(|_| format!("Block protocol '{}' doesn't support the option '{k}'", $scheme))?;
            builder = builder.with_config(key, v.clone());
        }
        let store = Arc::new(builder.build().map_err(|e| e.to_string())?);
        (store.clone() as Arc<dyn ObjectStore>, store as Arc<dyn MultipartStore>)
    }};
}

impl Remote {
    pub(crate) fn connect(opts: &ObjectOptions) -> Result<Remote, String> {
        let (scheme, _bucket, key) = opts.location()?;
        let url = opts.url.clone().unwrap_or_default();
        let path = ObjectPath::parse(key).map_err(|e| format!("'{url}': invalid object key: {e}"))?;
        // reqwest's TLS takes the process's crypto provider; ring is the
        // one the workspace builds (another caller may have set one).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: RETRIES,
            retry_timeout: Duration::from_secs(opts.timeout.unwrap_or(DEFAULT_TIMEOUT) * (RETRIES as u64 + 1)),
        };
        let (scheme, (store, multipart)) = match scheme {
            "s3" => ("s3", build_store!(AmazonS3Builder, AmazonS3ConfigKey, "s3", &url, opts, retry)),
            "gs" => ("gs", build_store!(GoogleCloudStorageBuilder, GoogleConfigKey, "gs", &url, opts, retry)),
            _ => ("az", build_store!(MicrosoftAzureBuilder, AzureConfigKey, "az", &url, opts, retry)),
        };
        Ok(Remote { runtime: runtime()?, store, multipart, path, url, scheme })
    }

    /// A remote on an in-memory store, for the tests of what is built on
    /// remotes.
    #[cfg(test)]
    pub(crate) fn in_memory(store: Arc<object_store::memory::InMemory>, key: &str) -> Remote {
        Remote {
            runtime: runtime().unwrap(),
            store: store.clone(),
            multipart: store,
            path: ObjectPath::from(key),
            url: format!("memory:///{key}"),
            scheme: "s3",
        }
    }

    pub(crate) fn run<F: Future>(&self, f: F) -> F::Output {
        // Futures polled here only hand their bytes to the connection
        // tasks on the runtime's threads, which do the socket writes.
        self.runtime.block_on(f)
    }

    /// The words for a failed request.
    pub(crate) fn failure(&self, e: object_store::Error) -> io::Error {
        let kind = match &e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                io::ErrorKind::PermissionDenied
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, describe(&self.url, &e))
    }
}

/// The runtime an object's requests run on.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("oxqcow-object-store")
        .on_thread_start(block_sigpipe)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the object store client: {e}"))
}

/// Blocks SIGPIPE in a runtime thread. The HTTP client writes requests
/// with `writev`, which raises SIGPIPE on a connection the server closed;
/// the CLI restores its default action (death, as QEMU's tools die on a
/// closed output pipe), so a server going away mid-upload killed the
/// process before it could abort the upload. Blocked in the thread that
/// writes, the signal stays pending there and the write fails with EPIPE.
fn block_sigpipe() {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    // Failing leaves the mask as it was: nothing else to do.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

/// A failed request in a few words: what went wrong, then the store's
/// own account of it (which names the request and the server's answer),
/// and the first cause it does not show (the HTTP client's errors keep
/// "Connection refused" or a timeout deep down).
pub fn describe(url: &str, e: &object_store::Error) -> String {
    use object_store::Error as E;
    let mut detail = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !detail.contains(&text) {
            detail = format!("{detail}: {text}");
        }
        cause = c.source();
    }
    match e {
        E::NotFound { .. } => format!("{url}: no such object ({detail})"),
        E::PermissionDenied { .. } => format!("{url}: access denied ({detail})"),
        E::Unauthenticated { .. } => format!("{url}: the credentials were refused ({detail})"),
        E::Precondition { .. } => format!("{url} changed since it was opened (412 Precondition Failed)"),
        _ => format!("{url}: {detail}"),
    }
}

/// An object, read with range requests; writes are refused.
pub struct ObjectStorage {
    remote: Remote,
    meta: ObjectMeta,
    reader: RangedReader,
}

impl ObjectStorage {
    /// Opens the object `opts` name: a HEAD request for its length and
    /// its ETag.
    pub fn open(opts: &ObjectOptions) -> Result<ObjectStorage, String> {
        let remote = Remote::connect(opts)?;
        let meta = remote.run(remote.store.head(&remote.path)).map_err(|e| remote.failure(e).to_string())?;
        let reader = RangedReader::new(opts.readahead, PIECE);
        Ok(ObjectStorage { remote, meta, reader })
    }

    /// The object's URL.
    pub fn url(&self) -> &str {
        &self.remote.url
    }
}

impl RangeFetch for ObjectStorage {
    fn object_len(&self) -> u64 {
        self.meta.size
    }

    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let url = &self.remote.url;
        let wanted = offset..offset + buf.len() as u64;
        let options = GetOptions {
            range: Some(GetRange::Bounded(wanted.clone())),
            if_match: self.meta.e_tag.clone(),
            // A store without ETags still has modification times.
            if_unmodified_since: self.meta.e_tag.is_none().then_some(self.meta.last_modified),
            ..GetOptions::default()
        };
        let changed = |what: String| io::Error::other(format!("{url} changed since it was opened ({what})"));
        let bytes = self.remote.run(async {
            let result = self.remote.store.get_opts(&self.remote.path, options).await?;
            let meta = result.meta.clone();
            let range = result.range.clone();
            Ok::<_, object_store::Error>((meta, range, result.bytes().await?))
        });
        let (meta, range, bytes) = match bytes {
            Ok(got) => got,
            // Deleted since it was opened.
            Err(object_store::Error::NotFound { .. }) => return Err(changed("404 Not Found".into())),
            Err(e) => return Err(self.remote.failure(e)),
        };
        if let (Some(pinned), Some(now)) = (&self.meta.e_tag, &meta.e_tag) {
            if pinned != now {
                return Err(changed(format!("ETag {pinned} is now {now}")));
            }
        }
        if meta.size != self.meta.size {
            return Err(changed(format!("its length {} is now {}", self.meta.size, meta.size)));
        }
        if range != wanted || bytes.len() != buf.len() {
            return Err(io::Error::other(format!(
                "{url}: bytes {}-{} asked, {} bytes at {}-{} answered",
                wanted.start,
                wanted.end - 1,
                bytes.len(),
                range.start,
                range.end.saturating_sub(1)
            )));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }
}

impl Storage for ObjectStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reader.read_at(self, buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.meta.size)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn driver_name(&self) -> &str {
        self.remote.scheme
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::ReadOnlyFilesystem, NO_WRITES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_key() {
        let o = ObjectOptions::from_url("s3://b/dir/disk.qcow2");
        assert_eq!(o.location(), Ok(("s3", "b", "dir/disk.qcow2")));
        assert_eq!(ObjectOptions::from_url("gs://b/k").location(), Ok(("gs", "b", "k")));
        for bad in ["s3://b", "s3://b/", "s3:///k", "ftp://b/k"] {
            let err = ObjectOptions::from_url(bad).location().unwrap_err();
            assert!(err.contains(&format!("'{bad}' does not name an object")), "{err}");
        }
        assert_eq!(ObjectOptions::default().location().unwrap_err(), "an object store driver requires a 'url' option");
    }

    #[test]
    fn options_apply_and_unknown_keys_are_refused_by_the_store() {
        let mut o = ObjectOptions::from_url("s3://b/k");
        o.apply("readahead", "64k").unwrap();
        o.apply("timeout", "3").unwrap();
        assert_eq!((o.readahead, o.timeout), (64 << 10, Some(3)));
        assert!(o.apply("timeout", "0").is_err());
        assert_eq!(o.apply("timeout", "x").unwrap_err(), "Parameter 'timeout' expects a number");
        o.apply("bogus", "1").unwrap();
        let err = Remote::connect(&o).err().expect("an unknown key was taken");
        assert_eq!(err, "Block protocol 's3' doesn't support the option 'bogus'");
    }
}
