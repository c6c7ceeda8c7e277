//! LTX object names in a replica: `%016x-%016x.ltx` for a TXID range.

/// The object name of an LTX file covering `min_txid..=max_txid`: `%016x-%016x.ltx`.
pub fn ltx_object_name(min_txid: u64, max_txid: u64) -> String {
    format!("{min_txid:016x}-{max_txid:016x}.ltx")
}

/// Parses an object name made by [`ltx_object_name`] (lowercase hex, as Litestream requires).
pub fn parse_ltx_object_name(name: &str) -> Option<(u64, u64)> {
    let b = name.as_bytes();
    if b.len() != 37 || b[16] != b'-' || &name[33..] != ".ltx" {
        return None;
    }
    let hex = |s: &str| {
        if s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            u64::from_str_radix(s, 16).ok()
        } else {
            None
        }
    };
    Some((hex(&name[..16])?, hex(&name[17..33])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        assert_eq!(
            ltx_object_name(1, 0x2a),
            "0000000000000001-000000000000002a.ltx"
        );
        assert_eq!(
            parse_ltx_object_name("0000000000000001-000000000000002a.ltx"),
            Some((1, 42))
        );
        assert_eq!(
            parse_ltx_object_name(&ltx_object_name(u64::MAX, u64::MAX)),
            Some((u64::MAX, u64::MAX))
        );
        for bad in [
            "0000000000000001-000000000000002A.ltx",
            "0000000000000001-000000000000002a.ltx.tmp",
            "000000000000001-000000000000002a.ltx",
            "0000000000000001_000000000000002a.ltx",
            "+000000000000001-000000000000002a.ltx",
            "0000000000000001-000000000000002a.ltz",
        ] {
            assert_eq!(parse_ltx_object_name(bad), None, "{bad}");
        }
    }
}
