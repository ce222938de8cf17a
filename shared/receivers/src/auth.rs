//! Sender authentication: the configured secret, compared in constant time.

use crate::config::SourceAuth;
use crate::request::WebhookRequest;

/// Why a request was refused with 401 (the message never contains the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The query parameter `code` is absent.
    #[error("missing query parameter \"code\": the webhook's WebhookKey must be sent as ?code=")]
    MissingCode,
    /// The configured header is absent.
    #[error("missing header \"{0}\": configure the endpoint to send it")]
    MissingHeader(String),
    /// The credential is present but wrong.
    #[error("the credential does not match the configured secret")]
    Mismatch,
}

/// Checks the request's credential against `auth`.
///
/// A WebhookKey arrives in the query string, which is decoded as a form: a `+` sent as it is
/// (not as `%2B`) reads as a space. Keys generated as Base64 (Azure Functions keys, most
/// secrets) hold `+`, and the reference does not say that Dataverse percent-encodes the key,
/// so the key is also compared with its spaces read back as `+`.
pub fn authorize(req: &WebhookRequest, auth: &SourceAuth) -> Result<(), AuthError> {
    let (given, expected) = match auth {
        SourceAuth::WebhookKey { secret } => {
            let given = req.query_param("code").ok_or(AuthError::MissingCode)?;
            let as_sent = given.replace(' ', "+");
            let exact = constant_time_eq(given.as_bytes(), secret.as_bytes());
            let plus = constant_time_eq(as_sent.as_bytes(), secret.as_bytes());
            return if exact | plus {
                Ok(())
            } else {
                Err(AuthError::Mismatch)
            };
        }
        SourceAuth::HttpHeader { name, value } => (
            req.header(name)
                .ok_or_else(|| AuthError::MissingHeader(name.clone()))?,
            value,
        ),
    };
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Mismatch)
    }
}

/// True when `a == b`, taking the same time whatever the position of the first difference.
///
/// Every byte up to the longer length is visited; only the lengths themselves can be told
/// apart by timing, which does not reveal the secret's content.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    // Non-zero when the lengths differ.
    let mut diff = u64::try_from(a.len() ^ b.len()).unwrap_or(u64::MAX);
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::SourceKind;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"", b"x"));
        // A prefix padded with NULs must not match.
        assert!(!constant_time_eq(b"ab\0", b"ab"));
        assert!(!constant_time_eq(b"Xbcdef", b"abcdef"));
    }

    #[test]
    fn webhook_key_reads_code() {
        let auth = SourceAuth::WebhookKey {
            secret: "k1".into(),
        };
        let ok = WebhookRequest::new(SourceKind::Dataverse, "").with_query("code", "k1");
        let bad = WebhookRequest::new(SourceKind::Dataverse, "").with_query("code", "k2");
        let none = WebhookRequest::new(SourceKind::Dataverse, "");
        assert_eq!(authorize(&ok, &auth), Ok(()));
        assert_eq!(authorize(&bad, &auth), Err(AuthError::Mismatch));
        assert_eq!(authorize(&none, &auth), Err(AuthError::MissingCode));
    }

    #[test]
    fn a_webhook_key_with_plus_signs_matches_whether_or_not_they_were_encoded() {
        let auth = SourceAuth::WebhookKey {
            secret: "aB+c/9+x==".into(),
        };
        for decoded in ["aB+c/9+x==", "aB c/9 x=="] {
            let req = WebhookRequest::new(SourceKind::Dataverse, "").with_query("code", decoded);
            assert_eq!(authorize(&req, &auth), Ok(()), "{decoded}");
        }
        for wrong in ["aB c/9 y==", "aB+c/9+x=", "aB-c/9-x=="] {
            let req = WebhookRequest::new(SourceKind::Dataverse, "").with_query("code", wrong);
            assert_eq!(authorize(&req, &auth), Err(AuthError::Mismatch), "{wrong}");
        }
        // A key that holds a space is still matched as it is.
        let spaced = SourceAuth::WebhookKey {
            secret: "a b".into(),
        };
        let req = WebhookRequest::new(SourceKind::Dataverse, "").with_query("code", "a b");
        assert_eq!(authorize(&req, &spaced), Ok(()));
    }

    #[test]
    fn header_auth_reads_header_case_insensitively() {
        let auth = SourceAuth::HttpHeader {
            name: "X-Api-Key".into(),
            value: "v".into(),
        };
        let ok = WebhookRequest::new(SourceKind::Fno, "").with_header("x-api-key", "v");
        let bad = WebhookRequest::new(SourceKind::Fno, "").with_header("x-api-key", "w");
        let none = WebhookRequest::new(SourceKind::Fno, "").with_query("code", "v");
        assert_eq!(authorize(&ok, &auth), Ok(()));
        assert_eq!(authorize(&bad, &auth), Err(AuthError::Mismatch));
        assert_eq!(
            authorize(&none, &auth),
            Err(AuthError::MissingHeader("X-Api-Key".into()))
        );
    }
}
