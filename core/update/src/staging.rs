//! Resumable reception of one artifact: chunks land at their offset in a preallocated file and
//! a bitmap of received chunks is checkpointed to disk, so a transfer interrupted at any point
//! (lost connection, broker restart, `kill -9`) resumes with the chunks it lacks.

use std::fs::File;
use std::path::{Path, PathBuf};

use tern_proto::Manifest;

use crate::UpdateError;

/// Chunks between bitmap checkpoints: after a crash at most this many are fetched again.
const CHECKPOINT_EVERY: u32 = 32;

/// One artifact being received, in `ROOT/SHA256HEX/`.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    manifest: Manifest,
    file: File,
    bitmap: Vec<u8>,
    received: u32,
    unsaved: u32,
}

fn io(context: &str, path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError {
    let context = format!("{context} {}", path.display());
    move |e| UpdateError::io(context, e)
}

impl Staging {
    /// Opens the staging area of `manifest`'s artifact under `root`, resuming what an earlier
    /// run received. A staging area left by a different manifest for the same bytes is reused
    /// only when its chunking matches; otherwise it starts over.
    pub fn open(root: &Path, manifest: &Manifest) -> Result<Staging, UpdateError> {
        let body = &manifest.body;
        let dir = root.join(crate::hex(&body.sha256));
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let data = dir.join("artifact.part");
        let chunking = dir.join("chunking");
        let expected = format!("{} {}", body.size, body.chunk_size);
        let resumable = std::fs::read_to_string(&chunking).ok().as_deref() == Some(&expected);
        let bytes = (body.chunk_count as usize).div_ceil(8);
        // The bitmap vouches for bytes in `artifact.part`; without the file (moved into an
        // install that a crash interrupted, or deleted) it vouches for nothing.
        let resumable = resumable && data.exists();
        let mut bitmap = if resumable {
            std::fs::read(dir.join("bitmap")).unwrap_or_default()
        } else {
            vec![]
        };
        if bitmap.len() != bytes {
            bitmap = vec![0; bytes];
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data)
            .map_err(io("opening", &data))?;
        // Reserving the whole size up front turns "disk full" into an early, clean failure.
        file.set_len(body.size).map_err(io("reserving", &data))?;
        if !resumable {
            write_durably(&chunking, expected.as_bytes())?;
        }
        let received = bitmap.iter().map(|b| b.count_ones()).sum();
        let mut staging = Staging {
            dir,
            manifest: manifest.clone(),
            file,
            bitmap,
            received,
            unsaved: 0,
        };
        // Bits past the last chunk must be clear, or `received` would count phantoms.
        for i in body.chunk_count..(staging.bitmap.len() * 8) as u32 {
            if staging.has(i) {
                staging.bitmap = vec![0; bytes];
                staging.received = 0;
                break;
            }
        }
        Ok(staging)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn total(&self) -> u32 {
        self.manifest.body.chunk_count
    }

    pub fn received(&self) -> u32 {
        self.received
    }

    pub fn is_complete(&self) -> bool {
        self.received == self.total()
    }

    pub fn has(&self, index: u32) -> bool {
        let (byte, bit) = ((index / 8) as usize, index % 8);
        self.bitmap.get(byte).is_some_and(|b| b & (1 << bit) != 0)
    }

    /// Chunk indices not yet received, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.total()).filter(|i| !self.has(*i))
    }

    fn expected_len(&self, index: u32) -> u64 {
        let b = &self.manifest.body;
        let start = index as u64 * b.chunk_size as u64;
        (b.size - start).min(b.chunk_size as u64)
    }

    /// Stores one chunk. Returns `false` for a duplicate (QoS 1 redelivery), which is ignored.
    pub fn write_chunk(&mut self, index: u32, data: &[u8]) -> Result<bool, UpdateError> {
        if index >= self.total() {
            return Err(UpdateError::BadChunk {
                index,
                reason: format!("the artifact has {} chunks", self.total()),
            });
        }
        if self.has(index) {
            return Ok(false);
        }
        let want = self.expected_len(index);
        if data.len() as u64 != want {
            return Err(UpdateError::BadChunk {
                index,
                reason: format!("{} bytes, expected {want}", data.len()),
            });
        }
        let offset = index as u64 * self.manifest.body.chunk_size as u64;
        write_at(&self.file, data, offset).map_err(io("writing", &self.dir))?;
        self.bitmap[(index / 8) as usize] |= 1 << (index % 8);
        self.received += 1;
        self.unsaved += 1;
        if self.unsaved >= CHECKPOINT_EVERY {
            self.checkpoint()?;
        }
        Ok(true)
    }

    /// Makes received chunks durable, then records them: the bitmap never claims data that a
    /// crash could lose.
    pub fn checkpoint(&mut self) -> Result<(), UpdateError> {
        if self.unsaved == 0 {
            return Ok(());
        }
        self.file.sync_data().map_err(io("syncing", &self.dir))?;
        write_durably(&self.dir.join("bitmap"), &self.bitmap)?;
        self.unsaved = 0;
        Ok(())
    }

    /// Checks the complete artifact against the manifest's sha256 and returns its path. On a
    /// mismatch the staging area is deleted: its bytes cannot be trusted chunk by chunk.
    pub fn finish(mut self) -> Result<PathBuf, UpdateError> {
        if !self.is_complete() {
            return Err(UpdateError::BadChunk {
                index: self.missing().next().unwrap_or(0),
                reason: "missing".into(),
            });
        }
        self.checkpoint()?;
        let path = self.dir.join("artifact.part");
        let got = crate::sha256_file(&path)?;
        if got != self.manifest.body.sha256 {
            let _ = std::fs::remove_dir_all(&self.dir);
            return Err(UpdateError::HashMismatch {
                expected: crate::hex(&self.manifest.body.sha256),
                got: crate::hex(&got),
            });
        }
        Ok(path)
    }

    /// Removes a staging area (after install, or to give up on an artifact).
    pub fn discard(root: &Path, sha256: &[u8; 32]) {
        let _ = std::fs::remove_dir_all(root.join(crate::hex(sha256)));
    }
}

#[cfg(unix)]
fn write_at(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

#[cfg(not(unix))]
fn write_at(mut file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(data)
}

/// temp file, fsync, rename, fsync the directory.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sign, SecretKey};

    fn artifact() -> Vec<u8> {
        (0..1000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn manifest(bytes: &[u8]) -> Manifest {
        sign("m", 1, bytes, 300, None, &SecretKey::generate().unwrap()).unwrap()
    }

    fn chunk(bytes: &[u8], i: u32) -> &[u8] {
        let s = i as usize * 300;
        &bytes[s..(s + 300).min(bytes.len())]
    }

    #[test]
    fn chunks_in_any_order_with_duplicates_rebuild_the_artifact() {
        let root = tempfile::tempdir().unwrap();
        let bytes = artifact();
        let m = manifest(&bytes);
        let mut s = Staging::open(root.path(), &m).unwrap();
        for i in [3, 1, 1, 0, 3, 2] {
            s.write_chunk(i, chunk(&bytes, i)).unwrap();
        }
        assert!(s.is_complete());
        let path = s.finish().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), bytes);
    }

    #[test]
    fn a_reopened_staging_area_resumes_with_only_the_missing_chunks() {
        let root = tempfile::tempdir().unwrap();
        let bytes = artifact();
        let m = manifest(&bytes);
        let mut s = Staging::open(root.path(), &m).unwrap();
        s.write_chunk(0, chunk(&bytes, 0)).unwrap();
        s.write_chunk(2, chunk(&bytes, 2)).unwrap();
        s.checkpoint().unwrap();
        drop(s);
        let s = Staging::open(root.path(), &m).unwrap();
        assert_eq!(s.received(), 2);
        assert_eq!(s.missing().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn a_bitmap_without_its_data_file_vouches_for_nothing() {
        // As after a crash in the middle of an install that had moved the artifact away.
        let root = tempfile::tempdir().unwrap();
        let bytes = artifact();
        let m = manifest(&bytes);
        let mut s = Staging::open(root.path(), &m).unwrap();
        for i in 0..4 {
            s.write_chunk(i, chunk(&bytes, i)).unwrap();
        }
        s.checkpoint().unwrap();
        drop(s);
        let dir = root.path().join(crate::hex(&m.body.sha256));
        std::fs::rename(dir.join("artifact.part"), root.path().join("moved")).unwrap();
        let s = Staging::open(root.path(), &m).unwrap();
        assert_eq!(s.received(), 0);
    }

    #[test]
    fn a_chunk_of_the_wrong_length_or_index_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let bytes = artifact();
        let mut s = Staging::open(root.path(), &manifest(&bytes)).unwrap();
        assert!(s.write_chunk(0, &bytes[..299]).is_err());
        assert!(
            s.write_chunk(3, &bytes[..300]).is_err(),
            "last chunk is 100 bytes"
        );
        assert!(s.write_chunk(4, &bytes[..100]).is_err());
        assert_eq!(s.received(), 0);
    }

    #[test]
    fn a_corrupted_chunk_fails_the_digest_and_clears_the_staging_area() {
        let root = tempfile::tempdir().unwrap();
        let bytes = artifact();
        let m = manifest(&bytes);
        let mut s = Staging::open(root.path(), &m).unwrap();
        for i in 0..4 {
            let mut c = chunk(&bytes, i).to_vec();
            if i == 2 {
                c[10] ^= 0xff;
            }
            s.write_chunk(i, &c).unwrap();
        }
        let err = s.finish().unwrap_err();
        assert!(matches!(err, UpdateError::HashMismatch { .. }), "{err}");
        let s = Staging::open(root.path(), &m).unwrap();
        assert_eq!(s.received(), 0);
    }
}
