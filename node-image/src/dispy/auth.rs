//! dispy's authentication: every process makes a random `sign`, and a peer proves it knows
//! the secret with `sha1(secret + sign)` as 40 hex characters. It is dispy's scheme, kept for
//! compatibility; the native protocol's challenge-response is the stronger one.

use ring::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY};

/// The length of the auth prefix of every TCP connection to a node.
pub const AUTH_LEN: usize = 40;

/// dispy's `auth_code(secret, sign)`.
pub fn auth_code(secret: &str, sign: &str) -> String {
    hex(digest(
        &SHA1_FOR_LEGACY_USE_ONLY,
        format!("{secret}{sign}").as_bytes(),
    )
    .as_ref())
}

/// A fresh random sign, 40 hex characters like dispy's.
pub fn new_sign() -> String {
    hex(digest(&SHA1_FOR_LEGACY_USE_ONLY, &dispy_core::auth::nonce()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_python_hashlib() {
        // hashlib.sha1(("s3cret" + "abc").encode()).hexdigest()
        assert_eq!(
            auth_code("s3cret", "abc"),
            "51314c11a048e18aceda210ee2689e1eec0c3daf"
        );
        assert_eq!(new_sign().len(), AUTH_LEN);
        assert_ne!(new_sign(), new_sign());
    }
}
