//! Which new connections are served: at most `MAX_CONNECTIONS_PER_ADDRESS`
//! from one client address, at most `MAX_CONNECTIONS` in all, and a small
//! reserve beyond both in which a refused connection still gets a clear
//! answer and a health check still gets its own.
//!
//! Why at the connection: every limit behind it (request rates, streams per
//! address) counts requests, and a connection that sends half a request
//! was never counted. One address could hold every descriptor of the
//! process with connections that each sent one byte, and then the accept
//! loop failed with "too many open files" for everyone, the balancer's
//! health checks included.
//!
//! The address is the peer's (IPv6 grouped by /64, as the stream limit
//! counts). A peer in `TRUSTED_PROXIES` is a balancer carrying many
//! clients: its connections count only against `MAX_CONNECTIONS`; the
//! balancer limits its own clients (lb-config/README.md).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections the reserve holds beyond the limits: refusals being
/// answered and health checks of a full instance.
pub const RESERVE: usize = 64;

/// Descriptors kept free of connections by default: the reserve, Redis
/// connections, files.
pub const SPARE_DESCRIPTORS: u64 = 2 * RESERVE as u64;

/// What happens to a new connection.
pub enum Admit {
    /// Served as usual.
    Served(Ticket),
    /// Answered from the reserve: health checks as usual, anything else
    /// with this refusal.
    Refused(Ticket, Refusal),
    /// Closed at once: an address over its limit that holds its whole
    /// share of the reserve.
    Closed,
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address holds `MAX_CONNECTIONS_PER_ADDRESS` already (429).
    PerAddress,
    /// The instance holds `MAX_CONNECTIONS` already (503).
    Full,
}

/// Counts connections per address and in all.
pub struct Admission {
    per_address: Mutex<HashMap<IpAddr, u32>>,
    max_per_address: u32,
    served: Arc<Semaphore>,
    /// Refusals being answered. Taken before each accept: while it is
    /// empty, new connections wait in the listen backlog (health checks
    /// among them) instead of being reset.
    reserve: Arc<Semaphore>,
    /// Of the reserve, what addresses over their limit may hold: the rest
    /// answers the health checks of a full instance.
    over_address: Arc<Semaphore>,
    trusted: Vec<ipnet::IpNet>,
    /// Connections refused (answered from the reserve or closed), for
    /// `/stats` and `/metrics`.
    pub refused_per_address: AtomicU64,
    pub refused_full: AtomicU64,
}

/// A connection's place; dropped when the connection closes.
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    /// A refusal of an address over its limit: its share of the reserve.
    _half: Option<OwnedSemaphorePermit>,
    _address: Option<AddressSlot>,
}

impl Ticket {
    fn reserve(spare: Spare, half: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            _permit: spare.0,
            _half: half,
            _address: None,
        }
    }
}

/// A place in the reserve; see [`Admission::spare`].
pub struct Spare(OwnedSemaphorePermit);

/// One connection counted against its address.
struct AddressSlot(Arc<Admission>, IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.0.lock();
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

impl Admission {
    pub fn new(
        max_connections: usize,
        max_per_address: u32,
        trusted: Vec<ipnet::IpNet>,
    ) -> Arc<Self> {
        // However it is set, no address gets more than half the instance.
        let half = u32::try_from(max_connections / 2)
            .unwrap_or(u32::MAX)
            .max(1);
        Arc::new(Self {
            per_address: Mutex::new(HashMap::new()),
            max_per_address: max_per_address.min(half),
            served: Arc::new(Semaphore::new(max_connections)),
            reserve: Arc::new(Semaphore::new(RESERVE)),
            over_address: Arc::new(Semaphore::new(RESERVE / 2)),
            trusted,
            refused_per_address: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place in the reserve, for the next connection in case it is
    /// refused; waits while every place is taken.
    pub async fn spare(&self) -> Spare {
        let permit = self.reserve.clone().acquire_owned().await;
        Spare(permit.expect("the reserve is never closed"))
    }

    /// Decides for a connection from `peer`; `spare` answers it if refused.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, spare: Spare) -> Admit {
        // The proxy's own address, not its /64 group: a trusted IPv6
        // balancer is listed by its address.
        let slot = if crate::address::is_trusted(peer, &self.trusted) {
            None
        } else {
            let ip = crate::address::client_address(peer, std::iter::empty(), &[]);
            match self.take_address(ip) {
                Some(slot) => Some(slot),
                None => {
                    self.refused_per_address.fetch_add(1, Ordering::Relaxed);
                    return match self.over_address.clone().try_acquire_owned() {
                        Ok(half) => {
                            Admit::Refused(Ticket::reserve(spare, Some(half)), Refusal::PerAddress)
                        }
                        Err(_) => Admit::Closed,
                    };
                }
            }
        };
        match self.served.clone().try_acquire_owned() {
            Ok(permit) => Admit::Served(Ticket {
                _permit: permit,
                _half: None,
                _address: slot,
            }),
            Err(_) => {
                self.refused_full.fetch_add(1, Ordering::Relaxed);
                Admit::Refused(Ticket::reserve(spare, None), Refusal::Full)
            }
        }
    }

    /// Counts one more connection of `ip`, unless it holds the maximum.
    fn take_address(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut map = self.lock();
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }

    /// Addresses with connections open (bounded by the connections).
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits a connection from `from`, as the accept loop does once a
    /// place in the reserve is free; `None` when none is (the loop waits).
    fn admit(admission: &Arc<Admission>, from: &str) -> Option<Admit> {
        let spare = Spare(admission.reserve.clone().try_acquire_owned().ok()?);
        Some(admission.admit(from.parse().unwrap(), spare))
    }

    fn served(a: &Option<Admit>) -> bool {
        matches!(a, Some(Admit::Served(_)))
    }

    fn refused(a: &Option<Admit>, why: Refusal) -> bool {
        matches!(a, Some(Admit::Refused(_, w)) if *w == why)
    }

    #[test]
    fn an_address_over_its_limit_is_refused_and_others_are_not() {
        let admission = Admission::new(10, 2, vec![]);
        let a = admit(&admission, "192.0.2.1");
        let b = admit(&admission, "192.0.2.1");
        assert!(served(&a) && served(&b));
        assert!(refused(
            &admit(&admission, "192.0.2.1"),
            Refusal::PerAddress
        ));
        assert!(served(&admit(&admission, "192.0.2.2")));
        // A closed connection gives its place back.
        drop(a);
        assert!(served(&admit(&admission, "192.0.2.1")));
        assert_eq!(admission.refused_per_address.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_trusted_proxies_only_against_the_instance() {
        let admission = Admission::new(3, 1, vec!["10.0.0.0/8".parse().unwrap()]);
        let _a = admit(&admission, "2001:db8::1");
        assert!(refused(
            &admit(&admission, "2001:db8::2"),
            Refusal::PerAddress
        ));
        // An IPv6 balancer listed by its own address, not its /64.
        let trusted_v6 = Admission::new(3, 1, vec!["2001:db8::5/128".parse().unwrap()]);
        assert!(served(&admit(&trusted_v6, "2001:db8::5")));
        assert!(served(&admit(&trusted_v6, "2001:db8::5")));
        let b = admit(&admission, "10.0.0.5");
        let c = admit(&admission, "10.0.0.5");
        assert!(served(&b) && served(&c));
        assert!(refused(&admit(&admission, "10.0.0.5"), Refusal::Full));
        assert_eq!(admission.addresses(), 1);
    }

    #[test]
    fn no_address_gets_more_than_half_the_instance() {
        let admission = Admission::new(10, 256, vec![]);
        let held: Vec<_> = (0..5).map(|_| admit(&admission, "192.0.2.1")).collect();
        assert!(held.iter().all(served));
        assert!(refused(
            &admit(&admission, "192.0.2.1"),
            Refusal::PerAddress
        ));
        assert!(served(&admit(&admission, "192.0.2.2")));
    }

    #[test]
    fn addresses_over_their_limit_hold_half_the_reserve_and_the_rest_waits() {
        let admission = Admission::new(0, 0, vec!["10.0.0.0/8".parse().unwrap()]);
        let mut held: Vec<Option<Admit>> = (0..RESERVE)
            .map(|_| admit(&admission, "192.0.2.1"))
            .collect();
        let answered = held
            .iter()
            .filter(|a| refused(a, Refusal::PerAddress))
            .count();
        assert_eq!(answered, RESERVE / 2);
        // The other half answers a full instance (its health checks).
        held.retain(|a| !matches!(a, Some(Admit::Closed)));
        for _ in 0..RESERVE / 2 {
            held.push(admit(&admission, "10.0.0.1"));
            assert!(refused(held.last().unwrap(), Refusal::Full));
        }
        // Then the next connection waits for a place.
        assert!(admit(&admission, "10.0.0.1").is_none());
        held.pop();
        assert!(admit(&admission, "10.0.0.1").is_some());
    }
}
