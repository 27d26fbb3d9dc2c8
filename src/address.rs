//! Which addresses a result URL may lead to: the guard against server-side request forgery.
//!
//! Result URLs, and the redirects they lead to, come from the network. A hostile or compromised
//! server could name an address inside the user's own network (a service on 127.0.0.1, a
//! router's admin page, cloud metadata at 169.254.169.254) and have krea-batch fetch it and save
//! the answer as a "result". So, unless the API base itself is on loopback (the simulation and
//! the tests, where everything is), downloads refuse every loopback, private, link-local,
//! unspecified, shared (CGNAT), multicast or reserved address, in any spelling:
//!
//! - a host written as an address (`127.1`, `2130706433`, `[::ffff:127.0.0.1]`; the URL parser
//!   brings them all to one form) is checked by [`check_host`] before any connection, for the
//!   first URL and for every redirect hop;
//! - a host name (`localhost` is refused by name) is checked after DNS resolution: the download
//!   client resolves through [`PublicResolver`], which drops such addresses, so a name that
//!   points inside the network (or is re-pointed there between two lookups) reaches nothing.

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// True for addresses a download must not reach unless the API itself is on loopback.
#[must_use]
pub(crate) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_unspecified()
        || a == 0 // 0.0.0.0/8, "this network"
        || ip.is_loopback() // 127.0.0.0/8
        || ip.is_private() // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local() // 169.254/16, cloud metadata
        || (a == 100 && (64..128).contains(&b)) // 100.64/10, shared address space (CGNAT)
        || ip.is_multicast()
        || a >= 240 // 240/4 reserved, and the broadcast address
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    // An IPv4 address inside an IPv6 one: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d) or
    // NAT64 (64:ff9b::a.b.c.d) reaches that IPv4 address.
    let embedded = match ip.segments() {
        [0x64, 0xff9b, 0, 0, 0, 0, high, low] => {
            Some(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low)))
        }
        _ if !ip.is_loopback() && !ip.is_unspecified() => ip.to_ipv4(),
        _ => None,
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || (first & 0xfe00) == 0xfc00 // fc00::/7, unique local
        || (first & 0xffc0) == 0xfe80 // fe80::/10, link-local
        || (first & 0xffc0) == 0xfec0 // fec0::/10, the old site-local
        || ip.is_multicast()
        || embedded.is_some_and(is_internal_v4)
}

/// Refuses a URL whose host is written as an internal address, or is `localhost` (or a name
/// under `.localhost`, which resolvers send to loopback). Other names pass here; their
/// addresses are checked when they are resolved ([`PublicResolver`]).
pub(crate) fn check_host(url: &Url) -> Result<(), HostError> {
    let Some(host) = url.host_str() else {
        return Err(HostError::NoHost);
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if is_internal(ip) {
            return Err(HostError::Internal(ip.to_string()));
        }
        return Ok(());
    }
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(HostError::Internal(bare.to_owned()));
    }
    Ok(())
}

/// Why a result host is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostError {
    /// The URL names no host.
    #[error("the URL has no host")]
    NoHost,
    /// The host is (or resolves only to) an internal address.
    #[error(
        "{0} is a loopback, private or link-local address; result files are downloaded only \
         from public addresses (unless the API itself is on loopback, as the simulation is)"
    )]
    Internal(String),
}

/// The download client's DNS resolver: the system's, minus every internal address. A name
/// with only internal addresses fails to resolve, so no connection is ever made to one.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public = public_only(found);
            if public.is_empty() {
                return Err(HostError::Internal(host).into());
            }
            let addrs: Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// The addresses that are not internal.
fn public_only(found: Vec<SocketAddr>) -> Vec<SocketAddr> {
    found.into_iter().filter(|addr| !is_internal(addr.ip())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_check(url: &str) -> Result<(), HostError> {
        check_host(&Url::parse(url).expect("a URL"))
    }

    #[test]
    fn every_spelling_of_an_internal_host_is_refused() {
        for url in [
            "http://127.0.0.1:8080/x.png",
            "http://127.0.0.1:1/",
            "https://127.1/",
            "https://2130706433/",
            "https://0x7f.0.0.1/",
            "https://0177.0.0.1/",
            "https://localhost/",
            "https://LOCALHOST./",
            "https://api.localhost/",
            "https://[::1]/",
            "https://0.0.0.0/",
            "https://0/",
            "https://[::]/",
            "https://10.1.2.3/",
            "https://172.16.0.1/",
            "https://172.31.255.255/",
            "https://192.168.1.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/",
            "https://224.0.0.1/",
            "https://255.255.255.255/",
            "https://[fc00::1]/",
            "https://[fd12:3456::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:10.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[::127.0.0.1]/",
            "https://[64:ff9b::127.0.0.1]/",
            "https://[ff02::1]/",
        ] {
            assert!(host_check(url).is_err(), "{url} must be refused");
        }
    }

    #[test]
    fn public_hosts_pass() {
        for url in [
            "https://gen.krea.ai/r/1.png",
            "https://8.8.8.8/",
            "https://172.32.0.1/",
            "https://100.128.0.1/",
            "https://[2606:4700::1111]/",
            "https://[::ffff:8.8.8.8]/",
            "https://notlocalhost.example/",
        ] {
            assert!(host_check(url).is_ok(), "{url} is public");
        }
    }

    #[test]
    fn the_resolver_drops_internal_addresses() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|a| a.parse().expect("socket address")).collect()
        };
        assert_eq!(
            public_only(addrs(&["127.0.0.1:0", "8.8.8.8:0", "[::1]:0", "[fe80::2]:0"])),
            addrs(&["8.8.8.8:0"])
        );
        assert!(public_only(addrs(&["192.168.0.2:0", "[::ffff:127.0.0.1]:0"])).is_empty());
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_inside_fails_to_resolve() {
        let name: Name = "localhost".parse().expect("a name");
        let err = PublicResolver.resolve(name).await.err().expect("refused");
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
