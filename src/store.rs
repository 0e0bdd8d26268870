//! sled: the indexes and the checkpoint of the projections, all derived
//! from the log and rebuildable from it. The only module that imports sled.
//!
//! Trees:
//! - `positions`: a sparse seq → (segment, offset) index, one key per
//!   [`POSITION_STRIDE`] seqs (sled is slow per key: STACK.md), so reading
//!   one event reads at most that many records from its anchor.
//! - `idempotency`: idempotency key → (request hash, first seq, event count).
//! - `meta`: `indexed` = the seq and chain hash the indexes reflect.
//! - `checkpoint`: the last checkpoint: a `head` row (seq, hash, format,
//!   length, chunk count) and the encoded state in [`CHECKPOINT_CHUNK`]
//!   chunks, written in one atomic batch. A tree of its own: sled rewrites
//!   a whole leaf when it consolidates one, so a checkpoint beside the
//!   `indexed` row was written again, megabytes at a time, as `indexed`
//!   moved (measured: a third of the CPU under write load). In chunks:
//!   sled's cache kept a whole 40 MB value after a restart (RSS 242 MiB
//!   after 1M events; its cache holds at most 16 MiB of chunks).
//!
//! sled's `flush` is not an fsync and 0.34 can lose recent writes in a
//! crash; that is fine here: everything is checked against the log at open
//! (seq and hash), and whatever is missing or disagrees is rebuilt.

use std::path::{Path, PathBuf};

use crate::events::{Bytes, Seq};
use crate::log::{Hash, Position};

/// One `positions` key per this many seqs: seqs 1, 1 + STRIDE, 1 + 2 × STRIDE …
pub const POSITION_STRIDE: u64 = 64;

/// Bumped whenever the checkpoint's encoding changes, or the state folded
/// from the same events does: an old checkpoint is then ignored and the
/// state replayed from the log. (5: a refund that clawed nothing back
/// counts among its line's refunds; 6: a reassigned customer's `via` is
/// cleared; 7: a paid bounty keeps its line's moment; 8: a referral moved
/// to another affiliate keeps its commission on the one it left; 9: a line
/// and a refund know they were excluded, a referral's billed total leaves
/// out what replays excluded, and balances take an applied replay's
/// corrected rules; 10: a billed total counts each line by the basis in
/// force at its moment; 11: a withdrawal paid or a credit dated in a
/// closed month is stated in the first open one.)
pub const CHECKPOINT_FORMAT: u32 = 11;

/// A problem of the store. Never fatal for the ledger: the store can be
/// deleted and rebuilt from the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("index store {path}: {source}")]
    Sled { path: PathBuf, source: sled::Error },
    #[error("index store {path}: damaged row: {what}")]
    Damaged { path: PathBuf, what: String },
}

/// What an idempotency key maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRow {
    pub request_hash: Bytes<32>,
    pub first_seq: Seq,
    pub count: u32,
}

/// The sled database of one data directory.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    positions: sled::Tree,
    idempotency: sled::Tree,
    meta: sled::Tree,
    checkpoint: sled::Tree,
    /// Earlier checkpoints kept for reads of the past, the last of each
    /// month (see [`Store::save_checkpoint`]): their heads by seq, small,
    /// so that listing them never reads a chunk ...
    kept_heads: sled::Tree,
    /// ... and their chunks by seq and index.
    kept: sled::Tree,
}

const INDEXED: &[u8] = b"indexed";
/// Where the checkpoint was kept before it was chunked.
const OLD_CHECKPOINT: &[u8] = b"checkpoint";
const CHECKPOINT_HEAD: &[u8] = b"head";

/// The checkpoint's state is stored in chunks of this many bytes.
pub const CHECKPOINT_CHUNK: usize = 1 << 20;

fn chunk_key(index: u32) -> [u8; 5] {
    let mut key = [b'c', 0, 0, 0, 0];
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The key of chunk `index` of the checkpoint kept at `seq`.
fn kept_key(seq: Seq, index: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&seq.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn seq_and_hash(bytes: &[u8]) -> Option<(Seq, Hash)> {
    let hash: Hash = bytes.get(8..40)?.try_into().ok()?;
    Some((be_u64(bytes, 0)?, hash))
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let sled_error = |source| StoreError::Sled {
            path: path.to_path_buf(),
            source,
        };
        let config = sled::Config::new().path(path).cache_capacity(16 << 20);
        // The data directory's own lock keeps other processes out, so a
        // sled lock held is this process's last store, whose background
        // flush can outlive it for a moment: wait for it (up to 5 s).
        // sled reports it as `Other`, naming the lock in the message
        // (sled 0.34.7, config.rs), so the kind alone never matched: the
        // store was rebuilt instead (seen under the whole test suite).
        let lock_held = |e: &std::io::Error| {
            e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().starts_with("could not acquire lock")
        };
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e)) if lock_held(&e) && attempts < 250 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.map_err(sled_error)?,
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(sled_error);
        let store = Store {
            path: path.to_path_buf(),
            positions: tree("positions")?,
            idempotency: tree("idempotency")?,
            meta: tree("meta")?,
            checkpoint: tree("checkpoint")?,
            kept_heads: tree("kept_checkpoint_heads")?,
            kept: tree("kept_checkpoints")?,
            db,
        };
        // Where checkpoints were kept before: beside `indexed`, in one value.
        for tree in [&store.meta, &store.checkpoint] {
            tree.remove(OLD_CHECKPOINT).map_err(store.sled_error())?;
        }
        Ok(store)
    }

    /// Deletes the store's directory (it is rebuilt from the log).
    pub fn destroy(path: &Path) -> std::io::Result<()> {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn sled_error(&self) -> impl FnOnce(sled::Error) -> StoreError + '_ {
        move |source| StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    fn damaged(&self, what: &str) -> StoreError {
        StoreError::Damaged {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    /// The seq and chain hash the indexes reflect (0 and zeros when empty).
    pub fn indexed(&self) -> Result<(Seq, Hash), StoreError> {
        match self.meta.get(INDEXED).map_err(self.sled_error())? {
            Some(bytes) => seq_and_hash(&bytes).ok_or_else(|| self.damaged("indexed")),
            None => Ok((0, [0; 32])),
        }
    }

    /// Empties every tree: the indexes no longer match the log.
    pub fn clear(&self) -> Result<(), StoreError> {
        for tree in [
            &self.positions,
            &self.idempotency,
            &self.meta,
            &self.checkpoint,
            &self.kept_heads,
            &self.kept,
        ] {
            tree.clear().map_err(self.sled_error())?;
        }
        Ok(())
    }

    /// Records the anchors and keys of events up to `seq` (with chain hash
    /// `hash`), in one batch per tree.
    pub fn index(
        &self,
        anchors: &[(Seq, Position)],
        keys: &[(String, KeyRow)],
        seq: Seq,
        hash: &Hash,
    ) -> Result<(), StoreError> {
        let mut positions = sled::Batch::default();
        for (anchor, position) in anchors {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&position.segment_first_seq.to_be_bytes());
            value[8..].copy_from_slice(&position.offset.to_be_bytes());
            positions.insert(&anchor.to_be_bytes(), &value);
        }
        self.positions
            .apply_batch(positions)
            .map_err(self.sled_error())?;
        if !keys.is_empty() {
            let mut batch = sled::Batch::default();
            for (key, row) in keys {
                let mut value = Vec::with_capacity(44);
                value.extend_from_slice(&row.request_hash.0);
                value.extend_from_slice(&row.first_seq.to_be_bytes());
                value.extend_from_slice(&row.count.to_be_bytes());
                batch.insert(key.as_bytes(), value);
            }
            self.idempotency
                .apply_batch(batch)
                .map_err(self.sled_error())?;
        }
        let mut indexed = Vec::with_capacity(40);
        indexed.extend_from_slice(&seq.to_be_bytes());
        indexed.extend_from_slice(hash);
        self.meta
            .insert(INDEXED, indexed)
            .map_err(self.sled_error())?;
        Ok(())
    }

    /// The nearest anchor at or before `seq`.
    pub fn anchor(&self, seq: Seq) -> Result<Option<(Seq, Position)>, StoreError> {
        let Some((key, value)) = self
            .positions
            .range(..=seq.to_be_bytes())
            .next_back()
            .transpose()
            .map_err(self.sled_error())?
        else {
            return Ok(None);
        };
        let anchor = u64::from_be_bytes(
            key.as_ref()
                .try_into()
                .map_err(|_| self.damaged("position key"))?,
        );
        let segment = u64::from_be_bytes(
            value
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| self.damaged("position"))?,
        );
        let offset = u64::from_be_bytes(
            value
                .get(8..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| self.damaged("position"))?,
        );
        Ok(Some((
            anchor,
            Position {
                segment_first_seq: segment,
                offset,
            },
        )))
    }

    pub fn idempotency_key(&self, key: &str) -> Result<Option<KeyRow>, StoreError> {
        let Some(value) = self
            .idempotency
            .get(key.as_bytes())
            .map_err(self.sled_error())?
        else {
            return Ok(None);
        };
        if value.len() != 44 {
            return Err(self.damaged("idempotency row"));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&value[..32]);
        let first_seq = u64::from_be_bytes(value[32..40].try_into().unwrap_or([0; 8]));
        let count = u32::from_be_bytes(value[40..44].try_into().unwrap_or([0; 4]));
        Ok(Some(KeyRow {
            request_hash: Bytes(hash),
            first_seq,
            count,
        }))
    }

    /// Saves the encoded state as of `seq` (chain hash `hash`, its last
    /// event recorded in `month`, a UTC `YYYYMM` number), replacing the last
    /// checkpoint.
    ///
    /// When the checkpoint replaced is of an earlier month, it is the last
    /// one of its month: it is kept first (under its seq), for reads of the
    /// past to start from, and of those kept only the newest `keep` stay. An audit of month-end balances then replays at most the
    /// log after the month's last checkpoint, not the whole log.
    pub fn save_checkpoint(
        &self,
        seq: Seq,
        hash: &Hash,
        month: u32,
        state: &[u8],
        keep: usize,
    ) -> Result<(), StoreError> {
        let chunks = state.chunks(CHECKPOINT_CHUNK).count();
        let count = u32::try_from(chunks).map_err(|_| self.damaged("checkpoint too large"))?;
        let mut head = Vec::with_capacity(60);
        head.extend_from_slice(&seq.to_be_bytes());
        head.extend_from_slice(hash);
        head.extend_from_slice(&CHECKPOINT_FORMAT.to_be_bytes());
        head.extend_from_slice(&(state.len() as u64).to_be_bytes());
        head.extend_from_slice(&count.to_be_bytes());
        head.extend_from_slice(&month.to_be_bytes());
        if keep > 0 {
            self.keep_replaced(month, keep)?;
        }
        let mut batch = sled::Batch::default();
        // Chunks of a longer checkpoint before go.
        for key in self
            .checkpoint
            .range(chunk_key(count)..=chunk_key(u32::MAX))
        {
            let (key, _) = key.map_err(self.sled_error())?;
            batch.remove(key);
        }
        for (index, chunk) in (0..count).zip(state.chunks(CHECKPOINT_CHUNK)) {
            batch.insert(&chunk_key(index), chunk);
        }
        batch.insert(CHECKPOINT_HEAD, head);
        self.checkpoint
            .apply_batch(batch)
            .map_err(self.sled_error())?;
        self.db.flush().map_err(self.sled_error())?;
        Ok(())
    }

    /// Keeps the current checkpoint, if it is of a month before `month`
    /// and of the current format, beside the others kept, then drops the
    /// oldest kept beyond `keep`.
    fn keep_replaced(&self, month: u32, keep: usize) -> Result<(), StoreError> {
        let Some(head) = self
            .checkpoint
            .get(CHECKPOINT_HEAD)
            .map_err(self.sled_error())?
        else {
            return Ok(());
        };
        let Some(seq) = be_u64(&head, 0) else {
            return Ok(());
        };
        // Heads written before months were recorded have none: not kept.
        let replaced_month = be_u32(&head, 56);
        if be_u32(&head, 40) != Some(CHECKPOINT_FORMAT) || replaced_month.is_none_or(|m| m >= month)
        {
            return Ok(());
        }
        let count = be_u32(&head, 52).ok_or_else(|| self.damaged("checkpoint chunk count"))?;
        // The chunks first, then the head that names them: a head is never
        // without its chunks.
        let mut chunks = sled::Batch::default();
        for index in 0..count {
            let chunk = self
                .checkpoint
                .get(chunk_key(index))
                .map_err(self.sled_error())?
                .ok_or_else(|| self.damaged("a checkpoint chunk is missing"))?;
            chunks.insert(&kept_key(seq, index)[..], chunk);
        }
        self.kept.apply_batch(chunks).map_err(self.sled_error())?;
        self.kept_heads
            .insert(seq.to_be_bytes(), &head[..])
            .map_err(self.sled_error())?;
        // The newest `keep` stay, this one among them; a head goes before
        // its chunks.
        let seqs = self.kept_seqs()?;
        for old in &seqs[..seqs.len().saturating_sub(keep)] {
            let Some(head) = self
                .kept_heads
                .remove(old.to_be_bytes())
                .map_err(self.sled_error())?
            else {
                continue;
            };
            let mut chunks = sled::Batch::default();
            for index in 0..be_u32(&head, 52).unwrap_or(0) {
                chunks.remove(&kept_key(*old, index)[..]);
            }
            self.kept.apply_batch(chunks).map_err(self.sled_error())?;
        }
        Ok(())
    }

    /// The seqs of the checkpoints kept for reads of the past, oldest first.
    pub fn kept_seqs(&self) -> Result<Vec<Seq>, StoreError> {
        let mut seqs = Vec::new();
        for key in self.kept_heads.iter().keys() {
            let key = key.map_err(self.sled_error())?;
            seqs.push(be_u64(&key, 0).ok_or_else(|| self.damaged("kept checkpoint"))?);
        }
        Ok(seqs)
    }

    /// Hands the last checkpoint of the current format (its seq, hash and
    /// state bytes) to `read`.
    pub fn load_checkpoint<T>(
        &self,
        read: impl FnOnce(Seq, Hash, &[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        let head = self
            .checkpoint
            .get(CHECKPOINT_HEAD)
            .map_err(self.sled_error())?;
        self.read_checkpoint(&self.checkpoint, head, chunk_key, read)
    }

    /// Hands the checkpoint kept at `seq` to `read`, as [`Self::load_checkpoint`].
    pub fn load_kept_checkpoint<T>(
        &self,
        seq: Seq,
        read: impl FnOnce(Seq, Hash, &[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        let head = self
            .kept_heads
            .get(seq.to_be_bytes())
            .map_err(self.sled_error())?;
        self.read_checkpoint(&self.kept, head, |i| kept_key(seq, i), read)
    }

    fn read_checkpoint<T, K: AsRef<[u8]>>(
        &self,
        tree: &sled::Tree,
        head: Option<sled::IVec>,
        chunk: impl Fn(u32) -> K,
        read: impl FnOnce(Seq, Hash, &[u8]) -> T,
    ) -> Result<Option<T>, StoreError> {
        let Some(head) = head else {
            return Ok(None);
        };
        let (seq, hash) = seq_and_hash(&head).ok_or_else(|| self.damaged("checkpoint"))?;
        if be_u32(&head, 40) != Some(CHECKPOINT_FORMAT) {
            return Ok(None);
        }
        let len = be_u64(&head, 44)
            .and_then(|len| usize::try_from(len).ok())
            .ok_or_else(|| self.damaged("checkpoint length"))?;
        let count = be_u32(&head, 52).ok_or_else(|| self.damaged("checkpoint chunk count"))?;
        // Never more than the chunks can hold, whatever a damaged row claims.
        let mut state = Vec::with_capacity(len.min(count as usize * CHECKPOINT_CHUNK));
        for index in 0..count {
            let chunk = tree
                .get(chunk(index))
                .map_err(self.sled_error())?
                .ok_or_else(|| self.damaged("a checkpoint chunk is missing"))?;
            state.extend_from_slice(&chunk);
        }
        if state.len() != len {
            return Err(self.damaged("checkpoint length"));
        }
        Ok(Some(read(seq, hash, &state)))
    }

    /// Writes what sled holds in memory to its files (not an fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(self.sled_error())?;
        Ok(())
    }
}
