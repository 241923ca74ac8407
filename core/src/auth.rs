//! HMAC-SHA256 challenge-response on the shared secret. Both sides prove they know the secret
//! over fresh nonces from both ends; the secret itself never crosses the wire.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

pub const NONCE_LEN: usize = 32;

#[derive(Debug, Clone, Copy)]
pub enum Role {
    Node,
    Client,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Node => b"dispy-native/1 node",
            Role::Client => b"dispy-native/1 client",
        }
    }
}

pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .expect("the system random source works");
    n
}

fn message(role: Role, client_nonce: &[u8], node_nonce: &[u8]) -> Vec<u8> {
    let mut m = role.label().to_vec();
    m.push(0);
    m.extend_from_slice(client_nonce);
    m.extend_from_slice(node_nonce);
    m
}

pub fn proof(secret: &str, role: Role, client_nonce: &[u8], node_nonce: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::sign(&key, &message(role, client_nonce, node_nonce))
        .as_ref()
        .to_vec()
}

/// Constant-time check of a peer's proof.
pub fn verify(
    secret: &str,
    role: Role,
    client_nonce: &[u8],
    node_nonce: &[u8],
    proof: &[u8],
) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, &message(role, client_nonce, node_nonce), proof).is_ok()
}

/// Equality that takes the same time wherever the inputs differ, for tokens and credentials.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes as hex: an owner credential no one else can guess.
pub fn random_credential() -> String {
    hex(&nonce())
}

/// An owner credential derived from an identity the client keeps across restarts (the
/// operator: its JobCluster's uid), keyed by the node secret, so a party without the secret
/// cannot compute it from the identity alone.
pub fn owner_credential(secret: &str, identity: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut m = b"dispy-native/1 owner".to_vec();
    m.push(0);
    m.extend_from_slice(identity.as_bytes());
    hex(hmac::sign(&key, &m).as_ref())
}

/// Hex SHA-256, used for file checksums.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Incremental SHA-256 for files read in chunks.
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Sha256 {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data)
    }
    pub fn hex(self) -> String {
        hex(self.0.finish().as_ref())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_role_and_nonces() {
        let (c, n) = (nonce(), nonce());
        let p = proof("s3cret", Role::Client, &c, &n);
        assert!(verify("s3cret", Role::Client, &c, &n, &p));
        assert!(!verify("other", Role::Client, &c, &n, &p));
        assert!(!verify("s3cret", Role::Node, &c, &n, &p));
        assert!(!verify("s3cret", Role::Client, &n, &c, &p));
        assert_ne!(c, n);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn owner_credentials_depend_on_secret_and_identity() {
        let a = owner_credential("s3cret", "team/wordcount 1234");
        assert_eq!(a, owner_credential("s3cret", "team/wordcount 1234"));
        assert_ne!(a, owner_credential("other", "team/wordcount 1234"));
        assert_ne!(a, owner_credential("s3cret", "team/wordcount 1235"));
        assert_eq!(a.len(), 64);
        assert_ne!(random_credential(), random_credential());
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Sha256::default();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.hex(), sha256_hex(b"abc"));
    }
}
