//! Fetching an image from a user's URL without letting the URL reach inside the network (SSRF).
//!
//! * only `http` and `https`, without credentials (`user:pass@`, which would be sent on to the
//!   host); at most `max_redirects` redirects, each checked like the first;
//! * every host name is resolved by [`GuardedResolver`], which drops loopback, private,
//!   link-local, unspecified and other special-purpose addresses ([`special_purpose`]) unless
//!   private URLs are allowed, and cloud-metadata addresses ([`cloud_metadata`]) always. reqwest
//!   uses it for every connection, redirects included, and connects only to the addresses it
//!   returns, so a name cannot resolve one way when checked and another when used;
//! * URLs with an IP literal (which skip DNS) are checked before the request and on each redirect;
//! * no proxy (an environment proxy would make the connection on our behalf, unchecked);
//! * connect, read and total timeouts, and a byte cap on the body (checked against
//!   `Content-Length` first, then while streaming).

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Url, redirect};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How URLs are fetched.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchConfig {
    /// Allow loopback, private and link-local addresses (for local testing). Cloud-metadata
    /// addresses stay refused.
    pub allow_private: bool,
    pub connect_timeout: Duration,
    /// Longest wait for any read (headers or a body chunk).
    pub read_timeout: Duration,
    /// Longest time for the whole fetch.
    pub total_timeout: Duration,
    /// Largest body in bytes.
    pub max_bytes: usize,
    /// Redirects followed at most.
    pub max_redirects: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_bytes: 20 << 20,
            max_redirects: 3,
        }
    }
}

impl FetchConfig {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let zero = Duration::ZERO;
        if self.connect_timeout == zero || self.read_timeout == zero || self.total_timeout == zero {
            return Err(crate::ServeError::Config(
                "fetch timeouts must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Why fetching a URL failed or was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("refused to fetch a '{0}' URL: only http and https are allowed")]
    Scheme(String),
    #[error(
        "refused to fetch a URL with credentials (user:password@): they would be sent to the \
         host; give a URL without them"
    )]
    Credentials,
    #[error("refused to fetch from '{host}' ({ip}): {reason} addresses are not allowed")]
    Refused {
        host: String,
        ip: IpAddr,
        reason: &'static str,
    },
    #[error("refused to follow more than {0} redirects")]
    TooManyRedirects(usize),
    #[error("cannot resolve '{host}': {message}")]
    Resolve { host: String, message: String },
    #[error("timed out fetching the URL")]
    Timeout,
    #[error("the URL's content is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the URL answered HTTP {0}")]
    Status(u16),
    #[error("could not fetch the URL: {0}")]
    Upstream(String),
}

impl FetchError {
    /// The HTTP status our API answers with: 4xx for what the user can fix in the URL, 403 for
    /// a refused address, 5xx (bad gateway, gateway timeout) for what the remote server did.
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            FetchError::InvalidUrl(_) | FetchError::Scheme(_) | FetchError::Credentials => {
                S::BAD_REQUEST
            }
            FetchError::Refused { .. } => S::FORBIDDEN,
            FetchError::TooLarge(_) => S::PAYLOAD_TOO_LARGE,
            FetchError::Timeout => S::GATEWAY_TIMEOUT,
            FetchError::TooManyRedirects(_)
            | FetchError::Resolve { .. }
            | FetchError::Status(_)
            | FetchError::Upstream(_) => S::BAD_GATEWAY,
        }
    }
}

/// Decides which addresses may be connected to.
pub trait AddressFilter: Send + Sync + 'static {
    /// Why `ip` is refused (a short noun phrase such as `"loopback"`), or `None` to allow it.
    fn refuse(&self, ip: IpAddr) -> Option<&'static str>;
}

/// The server's filter: [`cloud_metadata`] always, [`special_purpose`] unless `allow_private`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    pub allow_private: bool,
}

impl AddressFilter for AddressPolicy {
    fn refuse(&self, ip: IpAddr) -> Option<&'static str> {
        if cloud_metadata(ip) {
            return Some("cloud-metadata");
        }
        if self.allow_private {
            return None;
        }
        special_purpose(ip)
    }
}

/// Instance-metadata endpoints of the big clouds (AWS IMDS and its IPv6 twin, ECS task
/// metadata, AWS DNS and time, Alibaba, Oracle, Azure's host agent (WireServer), which hands
/// out a VM's extension settings and certificates beside the 169.254.169.254 IMDS). Refused
/// even with private URLs allowed.
const METADATA: [IpAddr; 10] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 253)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 123)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x123)),
];

/// Whether `ip`, or an IPv4 address it embeds (IPv4-mapped, IPv4-compatible, NAT64 or 6to4,
/// which reach that address), is a cloud-metadata endpoint.
pub fn cloud_metadata(ip: IpAddr) -> bool {
    METADATA.contains(&ip) || embedded_v4(ip).is_some_and(|v4| METADATA.contains(&IpAddr::V4(v4)))
}

/// The IPv4 address an IPv6 one carries and leads to, in the forms a connection can reach it
/// by: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if s[..6] == [0; 6] || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) {
        Some(embedded(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(embedded(s[1], s[2]))
    } else {
        None
    }
}

/// Why `ip` is not a public unicast address (`None` when it is): loopback, private,
/// link-local, unspecified, shared, multicast, documentation, reserved ... IPv6 forms that embed
/// an IPv4 address (mapped, NAT64, 6to4) are judged by that address.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(if a == 0 {
        "unspecified"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if a == 100 && (b & 0xc0) == 64 {
        "shared (carrier-grade NAT)"
    } else if a == 192 && b == 0 && c == 0 {
        "IETF-reserved"
    } else if a == 198 && (b & 0xfe) == 18 {
        "benchmarking"
    } else if ip.is_documentation() {
        "documentation"
    } else if ip.is_multicast() {
        "multicast"
    } else if a >= 240 {
        "reserved"
    } else {
        return None;
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return special_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    Some(if s[..6] == [0; 6] {
        "IPv4-compatible (deprecated)"
    } else if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        // NAT64: the gateway connects to the embedded IPv4 address.
        return special_v4(embedded(s[6], s[7]));
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        "local NAT64"
    } else if s[0] == 0x2002 {
        // 6to4: the relay delivers to the embedded IPv4 address.
        return special_v4(embedded(s[1], s[2]));
    } else if s[0] == 0x2001 && s[1] == 0 {
        "Teredo"
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        "documentation"
    } else if s[0] == 0x100 && s[1..4] == [0; 3] {
        "discard-only"
    } else if s[0] & 0xfe00 == 0xfc00 {
        "unique-local (private)"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "link-local"
    } else if s[0] & 0xffc0 == 0xfec0 {
        "site-local"
    } else if s[0] & 0xff00 == 0xff00 {
        "multicast"
    } else {
        return None;
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// reqwest's DNS resolver for every connection: the system resolver, then the filter. Only the
/// allowed addresses are returned (so only those are connected to); none left is an error.
pub struct GuardedResolver {
    filter: Arc<dyn AddressFilter>,
}

impl GuardedResolver {
    pub fn new(filter: Arc<dyn AddressFilter>) -> Self {
        Self { filter }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let filter = Arc::clone(&self.filter);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> BoxError {
                    Box::new(FetchError::Resolve {
                        host: host.clone(),
                        message: e.to_string(),
                    })
                })?
                .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match filter.refuse(a.ip()) {
                    Some(reason) => {
                        refused.get_or_insert((a.ip(), reason));
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let err = match refused {
                    Some((ip, reason)) => FetchError::Refused { host, ip, reason },
                    None => FetchError::Resolve {
                        host,
                        message: "no addresses".into(),
                    },
                };
                return Err(Box::new(err) as BoxError);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Checks what can be checked before connecting: the scheme, credentials, and an IP-literal
/// host.
fn check_url(url: &Url, filter: &dyn AddressFilter) -> Result<(), FetchError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::Scheme(url.scheme().to_owned()));
    }
    // reqwest would send them as basic authentication: a user's secret handed to whatever host
    // the URL names, and a way to drive authenticated requests from the server.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FetchError::Credentials);
    }
    let ip = match url.host() {
        None => return Err(FetchError::InvalidUrl("the URL has no host".into())),
        Some(url::Host::Domain(_)) => return Ok(()),
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
    };
    match filter.refuse(ip) {
        Some(reason) => Err(FetchError::Refused {
            host: ip.to_string(),
            ip,
            reason,
        }),
        None => Ok(()),
    }
}

/// A fetched body and a file name for it (the URL's last path segment).
#[derive(Debug)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub name: String,
}

/// The guarded HTTP client.
pub struct Fetcher {
    client: reqwest::Client,
    filter: Arc<dyn AddressFilter>,
    max_bytes: usize,
}

impl Fetcher {
    /// A fetcher with the server's [`AddressPolicy`].
    pub fn new(config: &FetchConfig) -> crate::Result<Self> {
        let policy = AddressPolicy {
            allow_private: config.allow_private,
        };
        Self::with_filter(config, Arc::new(policy))
    }

    /// A fetcher with any address filter (tests use one that refuses chosen addresses).
    pub fn with_filter(
        config: &FetchConfig,
        filter: Arc<dyn AddressFilter>,
    ) -> crate::Result<Self> {
        let redirect_filter = Arc::clone(&filter);
        let max_redirects = config.max_redirects;
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(FetchError::TooManyRedirects(max_redirects));
            }
            match check_url(attempt.url(), &*redirect_filter) {
                Ok(()) => attempt.follow(),
                // The remote server's doing, not the user's: a bad gateway, not a bad request.
                Err(FetchError::Scheme(scheme)) => attempt.error(FetchError::Upstream(format!(
                    "the URL redirected to a '{scheme}' URL; only http and https are followed"
                ))),
                Err(FetchError::Credentials) => attempt.error(FetchError::Upstream(
                    "the URL redirected to a URL with credentials, which is not followed".into(),
                )),
                Err(e) => attempt.error(e),
            }
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(Arc::clone(&filter))))
            .redirect(policy)
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .timeout(config.total_timeout)
            .user_agent(concat!("denoise-serve/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::ServeError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            filter,
            max_bytes: config.max_bytes,
        })
    }

    /// Fetches `url` (see the module doc for what is refused).
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let url = Url::parse(url.trim()).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        check_url(&url, &*self.filter)?;
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "image/*")
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        if status.is_redirection() {
            // A redirect reqwest would not follow (a scheme it cannot fetch, or no Location).
            let target = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| l.chars().take(200).collect::<String>());
            return Err(FetchError::Upstream(match target {
                Some(to) => format!(
                    "the URL redirected to '{to}', which cannot be followed (only http and https)"
                ),
                None => format!(
                    "the URL answered HTTP {} without a location",
                    status.as_u16()
                ),
            }));
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let name = response
            .url()
            .path_segments()
            .and_then(|mut s| s.next_back())
            .filter(|s| !s.is_empty())
            .unwrap_or("url")
            .to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if bytes.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge(self.max_bytes));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Fetched { bytes, name })
    }
}

/// Our own refusals travel inside reqwest's error (from the resolver or the redirect policy):
/// find them; otherwise say what kind of failure it was.
fn classify(err: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(ours) = e.downcast_ref::<FetchError>() {
            return ours.clone();
        }
        source = e.source();
    }
    if err.is_timeout() {
        return FetchError::Timeout;
    }
    // The innermost cause is the useful part ("connection refused"), without the URL.
    let mut root: &(dyn std::error::Error + 'static) = &err;
    while let Some(next) = root.source() {
        root = next;
    }
    if err.is_connect() {
        FetchError::Upstream(format!("cannot connect: {root}"))
    } else {
        FetchError::Upstream(root.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_purpose_addresses_are_named() {
        for (addr, reason) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("100.100.100.200", "shared (carrier-grade NAT)"),
            ("192.0.0.192", "IETF-reserved"),
            ("198.18.0.1", "benchmarking"),
            ("192.0.2.1", "documentation"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::127.0.0.1", "IPv4-compatible (deprecated)"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("2001:0:1::1", "Teredo"),
            ("2001:db8::1", "documentation"),
            ("fd00:ec2::254", "unique-local (private)"),
            ("fc00::1", "unique-local (private)"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
        ] {
            assert_eq!(special_purpose(ip(addr)), Some(reason), "{addr}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert_eq!(special_purpose(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn cloud_metadata_is_refused_even_when_private_is_allowed() {
        let open = AddressPolicy {
            allow_private: true,
        };
        let strict = AddressPolicy::default();
        for addr in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
            "::ffff:168.63.129.16",
        ] {
            assert_eq!(open.refuse(ip(addr)), Some("cloud-metadata"), "{addr}");
            assert_eq!(strict.refuse(ip(addr)), Some("cloud-metadata"), "{addr}");
        }
        assert_eq!(open.refuse(ip("127.0.0.1")), None);
        assert_eq!(strict.refuse(ip("127.0.0.1")), Some("loopback"));
        assert_eq!(strict.refuse(ip("93.184.215.14")), None);
    }

    #[test]
    fn urls_are_checked_before_connecting() {
        let strict = AddressPolicy::default();
        let check = |u: &str| check_url(&Url::parse(u).unwrap(), &strict);
        assert!(
            matches!(check("ftp://example.com/a.png"), Err(FetchError::Scheme(s)) if s == "ftp")
        );
        assert!(matches!(
            check("file:///etc/passwd"),
            Err(FetchError::Scheme(_))
        ));
        assert!(matches!(
            check("http://127.0.0.1/"),
            Err(FetchError::Refused { .. })
        ));
        // WHATWG URL parsing turns odd IPv4 spellings into the address they mean.
        assert!(matches!(
            check("http://2130706433/"),
            Err(FetchError::Refused { .. })
        ));
        assert!(matches!(
            check("http://0x7f.1/"),
            Err(FetchError::Refused { .. })
        ));
        assert!(matches!(
            check("http://[::1]:8080/"),
            Err(FetchError::Refused { .. })
        ));
        assert!(check("https://example.com/a.png").is_ok());
    }

    #[test]
    fn urls_with_credentials_are_refused_as_bad_requests() {
        let open = AddressPolicy {
            allow_private: true,
        };
        for url in [
            "http://user:pass@example.com/a.png",
            "http://user@example.com/a.png",
            "https://:secret@example.com/a.png",
            "http://user:pass@127.0.0.1/a.png",
        ] {
            let err = check_url(&Url::parse(url).unwrap(), &open).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST, "{url}");
            assert!(err.to_string().contains("credentials"), "{err}");
        }
        // An '@' in the path or query is not a credential.
        assert!(
            check_url(
                &Url::parse("http://example.com/a@b.png?x=@").unwrap(),
                &open
            )
            .is_ok()
        );
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let strict = GuardedResolver::new(Arc::new(AddressPolicy::default()));
        let err = strict
            .resolve("localhost".parse::<Name>().unwrap())
            .await
            .err()
            .expect("localhost is loopback only");
        let err = err.downcast_ref::<FetchError>().unwrap();
        assert!(
            matches!(
                err,
                FetchError::Refused {
                    reason: "loopback",
                    ..
                }
            ),
            "{err}"
        );
        let open = GuardedResolver::new(Arc::new(AddressPolicy {
            allow_private: true,
        }));
        let addrs: Vec<_> = open
            .resolve("localhost".parse::<Name>().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    /// Refuses 127.0.0.2 only: lets a loopback fixture stand in for a public server.
    struct DenySecondLoopback;
    impl AddressFilter for DenySecondLoopback {
        fn refuse(&self, ip: IpAddr) -> Option<&'static str> {
            (ip == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).then_some("test-refused")
        }
    }

    /// A one-thread HTTP server: `/hop/N` redirects to `/hop/N-1`, `/hop/0` answers "ok",
    /// `/escape` redirects to 127.0.0.2, `/to-file` and `/to-ftp` to those schemes,
    /// `/to-credentials` to `/hop/0` with a user and password.
    fn fixture() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 2048];
                let n = stream.read(&mut buf).unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let redirect = |to: String| {
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                };
                let response = if path == "/escape" {
                    redirect(format!("http://127.0.0.2:{port}/hop/0"))
                } else if path == "/to-file" {
                    redirect("file:///etc/passwd".into())
                } else if path == "/to-ftp" {
                    redirect("ftp://example.com/a.png".into())
                } else if path == "/to-credentials" {
                    redirect(format!("http://user:pass@127.0.0.1:{port}/hop/0"))
                } else if let Some(n) = path
                    .strip_prefix("/hop/")
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    if n == 0 {
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".into()
                    } else {
                        redirect(format!("/hop/{}", n - 1))
                    }
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .into()
                };
                let _ = stream.write_all(response.as_bytes());
            }
        });
        port
    }

    #[tokio::test]
    async fn redirects_are_counted_and_every_hop_is_checked() {
        let port = fixture();
        let fetcher =
            Fetcher::with_filter(&FetchConfig::default(), Arc::new(DenySecondLoopback)).unwrap();
        let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
        let ok = fetcher.fetch(&url("/hop/3")).await.unwrap();
        assert_eq!((ok.bytes.as_slice(), ok.name.as_str()), (&b"ok"[..], "0"));
        assert_eq!(
            fetcher.fetch(&url("/hop/4")).await.unwrap_err(),
            FetchError::TooManyRedirects(3)
        );
        let err = fetcher.fetch(&url("/escape")).await.unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::Refused {
                    reason: "test-refused",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            fetcher.fetch(&url("/missing")).await.unwrap_err(),
            FetchError::Status(404)
        );
        // A redirect to another scheme, or to a URL with credentials, is the remote server's
        // doing: a bad gateway that says where it pointed, not a bad request or a bare "HTTP 302".
        for (path, needle) in [
            ("/to-file", "file"),
            ("/to-ftp", "ftp"),
            ("/to-credentials", "credentials"),
        ] {
            let err = fetcher.fetch(&url(path)).await.unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::BAD_GATEWAY, "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        let small = FetchConfig {
            max_bytes: 1,
            ..FetchConfig::default()
        };
        let fetcher = Fetcher::with_filter(&small, Arc::new(DenySecondLoopback)).unwrap();
        assert_eq!(
            fetcher.fetch(&url("/hop/0")).await.unwrap_err(),
            FetchError::TooLarge(1)
        );
    }
}
