//! The addresses of Services imported from federated clusters: the controller allocates each
//! imported Service's virtual IP from [`NETWORK`]`/`[`PREFIX_LEN`] (never routed; every
//! connection to it is captured), and the ztunnel refuses a connection to an address there
//! that no imported Service holds, with the reason, instead of sending it nowhere.

use std::net::{IpAddr, Ipv4Addr};

/// The network of clusterset virtual IPs: `240.240.0.0/16`.
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 0);
/// Its prefix length.
pub const PREFIX_LEN: u8 = 16;
/// The DNS domain of imported Services: `<svc>.<ns>.svc.clusterset.local`.
pub const DOMAIN: &str = "clusterset.local";

/// Whether `ip` is in the clusterset network.
pub fn contains(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX << (32 - u32::from(PREFIX_LEN));
            u32::from(v4) & mask == u32::from(NETWORK)
        }
        IpAddr::V6(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_is_240_240_slash_16() {
        assert!(contains("240.240.0.1".parse().expect("ip")));
        assert!(contains("240.240.255.254".parse().expect("ip")));
        assert!(!contains("240.241.0.1".parse().expect("ip")));
        assert!(!contains("10.96.0.1".parse().expect("ip")));
        assert!(!contains("::1".parse().expect("ip")));
    }
}
