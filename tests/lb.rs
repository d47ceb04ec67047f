//! Load-balancer configs from `lb-config/`, run against the real balancers.

mod support;
