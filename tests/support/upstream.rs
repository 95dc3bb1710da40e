//! Test upstreams that verify the injected credential.
