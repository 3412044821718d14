//! Lowercase hex on the hot path (audit lines, request and trace ids, the audit chain): one
//! table lookup per byte each way, where a nibble at a time cost twice the instructions.

/// The two lowercase hex digits of every byte value.
const PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

/// The value of each lowercase hex digit; [`NOT_HEX`] for every other byte.
const VALUES: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 16 {
        t[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// What [`value`] gives for a byte that is not a lowercase hex digit: OR-ing values together
/// and checking the result is below 16 checks a whole run at once.
pub(crate) const NOT_HEX: u8 = 0xf0;

/// The two lowercase hex digits of `b`.
pub(crate) fn pair(b: u8) -> [u8; 2] {
    PAIRS[usize::from(b)]
}

/// The value of the lowercase hex digit `c`, or [`NOT_HEX`].
pub(crate) fn value(c: u8) -> u8 {
    VALUES[usize::from(c)]
}

/// Writes `bytes` as lowercase hex into `out` (twice as long; extra room is left as it is).
pub(crate) fn encode_into(out: &mut [u8], bytes: &[u8]) {
    for (digits, &b) in out.chunks_exact_mut(2).zip(bytes) {
        digits.copy_from_slice(&pair(b));
    }
}

/// A SHA-256 as 64 lowercase hex digits (fixed sizes: the loop is unrolled, no bounds checks).
pub(crate) fn of_hash(hash: &[u8; 32]) -> [u8; 64] {
    let mut out = [0; 64];
    for (i, &b) in hash.iter().enumerate() {
        let [hi, lo] = pair(b);
        out[2 * i] = hi;
        out[2 * i + 1] = lo;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tables_match_the_hex_crate() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = vec![0; 512];
        super::encode_into(&mut out, &all);
        assert_eq!(out, hex::encode(&all).into_bytes());
        let hash: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(
            super::of_hash(&hash).to_vec(),
            hex::encode(hash).into_bytes()
        );
        for c in 0..=255u8 {
            let want = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => super::NOT_HEX,
            };
            assert_eq!(super::value(c), want, "{c:#x}");
        }
    }
}
