//! What the fuzz targets read their events from.

use commission_ledger::events::{Recorded, Timestamp, decode};

/// The events of a fuzz input: `[u16 LE length][postcard bytes]` records,
/// at most `most`; each that decodes is numbered on from the last, as
/// `import` requires, and one whose time goes back is skipped, as
/// `import` refuses it.
pub fn records(mut data: &[u8], most: usize) -> Vec<Recorded> {
    let mut out = Vec::new();
    let mut last_at = Timestamp::MIN;
    while data.len() >= 2 && out.len() < most {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (record, next) = rest.split_at(len.min(rest.len()));
        data = next;
        let Ok(mut recorded) = decode(record) else {
            continue;
        };
        if recorded.recorded_at < last_at {
            continue;
        }
        last_at = recorded.recorded_at;
        recorded.seq = out.len() as u64 + 1;
        out.push(recorded);
    }
    out
}
