//! A pipeline step's `/shared` folder on the node.
//!
//! Before the run the folder is put together from what the steps it needs
//! saved (the main server merges their manifests); after the run it is
//! saved as a manifest of paths, modes, sizes and BLAKE3 hashes, whose bytes
//! are content-addressed objects of the project: a blob per large file, and
//! small files packed together. Only objects the store lacks are uploaded,
//! so files unchanged since the folder was put together cost nothing.
//!
//! Every saved file is kept in the node's cache under its hash (a hard
//! link: the run has ended, nothing writes to it any more), so the next
//! step on the same node copies it from there and fetches nothing; another
//! node fetches only what its cache lacks.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{info, warn};
use ud_schemas::dispatch::{
    OutputFile, SharedDeleted, SharedFile, SharedManifest, StorageReply, StorageRequest,
    SHARED_MANIFEST,
};
use ud_schemas::TaskId;

use crate::transfer::{inside, TransferError, Transfers};

/// Files from this size on are objects of their own; smaller ones are packed.
pub const LARGE: u64 = 1 << 20;
/// Largest pack of small files.
pub const PACK_MAX: u64 = 64 << 20;
/// Cache entries used this recently are never evicted.
const KEEP_RECENT: std::time::Duration = std::time::Duration::from_secs(600);

/// The node's cache of `/shared` file contents, by BLAKE3 hash.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
    limit_bytes: u64,
}

fn io(what: &str, e: std::io::Error) -> TransferError {
    TransferError::Refused(format!("/shared: {what}: {e}"))
}

impl Cache {
    pub fn new(dir: PathBuf, limit_mb: u64) -> Self {
        Self {
            dir,
            limit_bytes: limit_mb.saturating_mul(1 << 20),
        }
    }

    fn at(&self, hash: &str) -> PathBuf {
        self.dir.join(hash.get(..2).unwrap_or("00")).join(hash)
    }

    pub fn has(&self, hash: &str) -> bool {
        self.at(hash).is_file()
    }

    /// Keeps `file`'s bytes (known to hash to `hash`) in the cache.
    fn keep(&self, file: &Path, hash: &str) -> std::io::Result<()> {
        let dest = self.at(hash);
        if dest.is_file() {
            return Ok(());
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = dest.with_extension(format!("tmp{}", rand::random::<u32>()));
        if std::fs::hard_link(file, &tmp).is_err() {
            std::fs::copy(file, &tmp)?;
        }
        std::fs::rename(&tmp, &dest)
    }

    /// Copies the cached bytes of `hash` to `dest` (a reflink where the
    /// file system has them), marking the entry as used.
    fn copy_out(&self, hash: &str, dest: &Path) -> std::io::Result<()> {
        let src = self.at(hash);
        std::fs::copy(&src, dest)?;
        let _ = std::fs::File::options()
            .write(true)
            .open(&src)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Ok(())
    }

    /// Drops the least recently used entries while the cache is over its limit.
    pub fn evict(&self) -> std::io::Result<u64> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        let Ok(dirs) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        for d in dirs.flatten() {
            for e in std::fs::read_dir(d.path())?.flatten() {
                let Ok(m) = e.metadata() else { continue };
                total += m.len();
                // What was used a moment ago may be on its way into a run.
                let recent = m
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|age| age < KEEP_RECENT);
                if !recent {
                    entries.push((m.modified().ok(), m.len(), e.path()));
                }
            }
        }
        if total <= self.limit_bytes {
            return Ok(0);
        }
        entries.sort();
        let mut freed = 0;
        for (_, size, path) in entries {
            if total - freed <= self.limit_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                freed += size;
            }
        }
        Ok(freed)
    }
}

/// The folder as it was put together: what the run's changes are measured against.
#[derive(Clone, Debug, Default)]
pub struct Base {
    manifest: SharedManifest,
    /// Path -> its entry, and the size and modification time it was left with.
    placed: HashMap<String, (SharedFile, u64, i64)>,
}

/// Where a run's `/shared` folder is on the node, next to its workspace.
pub fn dir_of(workspace: &Path) -> PathBuf {
    PathBuf::from(format!("{}.shared", workspace.display()))
}

/// What a base is kept as beside its folder, for an agent that restarts
/// while the run goes.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptBase {
    manifest: SharedManifest,
    placed: Vec<(String, u64, i64)>,
}

impl Base {
    fn kept_at(dir: &Path) -> PathBuf {
        PathBuf::from(format!("{}.base.json", dir.display()))
    }

    /// Keeps what `dir` was put together from, beside it.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let kept = KeptBase {
            manifest: self.manifest.clone(),
            placed: self
                .placed
                .iter()
                .map(|(p, (_, size, mtime))| (p.clone(), *size, *mtime))
                .collect(),
        };
        std::fs::write(Self::kept_at(dir), serde_json::to_vec(&kept)?)
    }

    /// What `dir` was put together from, as [`Base::write`] kept it.
    pub fn read(dir: &Path) -> Option<Self> {
        let kept: KeptBase =
            serde_json::from_slice(&std::fs::read(Self::kept_at(dir)).ok()?).ok()?;
        let by_path: HashMap<&str, &SharedFile> = kept
            .manifest
            .files
            .iter()
            .map(|f| (f.path.as_str(), f))
            .collect();
        let placed = kept
            .placed
            .iter()
            .filter_map(|(p, size, mtime)| {
                Some((
                    p.clone(),
                    ((*by_path.get(p.as_str())?).clone(), *size, *mtime),
                ))
            })
            .collect();
        Some(Self {
            manifest: kept.manifest,
            placed,
        })
    }

    /// Drops what [`Base::write`] kept.
    pub fn forget(dir: &Path) {
        let _ = std::fs::remove_file(Self::kept_at(dir));
    }
}

/// Hex BLAKE3 of a file's bytes.
fn blake3_of(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec()
}

/// Writes the files of `files` that live in the object downloaded to
/// `local`, checking each one's hash.
fn place_from(local: &Path, files: &[SharedFile], dir: &Path) -> Result<(), TransferError> {
    let mut object = std::fs::File::open(local).map_err(|e| io("a fetched object", e))?;
    for f in files {
        let dest = inside(dir, &f.path).map_err(TransferError::Refused)?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(&f.path, e))?;
        }
        object
            .seek(SeekFrom::Start(f.offset))
            .map_err(|e| io(&f.object, e))?;
        let mut out = std::fs::File::create(&dest).map_err(|e| io(&f.path, e))?;
        let mut hasher = blake3::Hasher::new();
        let mut left = f.size;
        let mut buf = vec![0u8; (f.size.min(1 << 20) as usize).max(1)];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = object
                .read(&mut buf[..want])
                .map_err(|e| io(&f.object, e))?;
            if n == 0 {
                return Err(TransferError::Refused(format!(
                    "/shared: {} ends before {} of {}",
                    f.object, f.path, f.size
                )));
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| io(&f.path, e))?;
            left -= n as u64;
        }
        if hasher.finalize().to_hex().as_str() != f.blake3 {
            return Err(TransferError::Refused(format!(
                "/shared: {} read from {} does not match its hash",
                f.path, f.object
            )));
        }
    }
    Ok(())
}

/// Puts the run's `/shared` together in `dir` (`empty`: it starts from no
/// step's folder); returns what it started
/// from and the bytes of objects fetched from the store (besides its
/// manifest).
pub async fn restore(
    transfers: &Transfers,
    cache: &Cache,
    task: TaskId,
    attempt: u32,
    dir: &Path,
    empty: bool,
) -> Result<(Base, u64), TransferError> {
    if empty {
        // A first step: nothing to ask for.
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io("creating the folder", e))?;
        return Ok((Base::default(), 0));
    }
    let reply = transfers
        .ask(StorageRequest::SharedRestore {
            task_id: task,
            attempt,
        })
        .await?;
    let StorageReply::Shared {
        manifest: manifest_url,
        objects,
    } = reply
    else {
        return Err(TransferError::Refused(
            "unexpected answer to a request for /shared".into(),
        ));
    };
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io("creating the folder", e))?;
    let fetch_dir = dir.with_extension("fetch");
    let local = fetch_dir.join(SHARED_MANIFEST);
    transfers
        .mover()
        .download(&manifest_url.url, &local, manifest_url.size)
        .await
        .map_err(|reason| TransferError::Input {
            object: "/shared manifest".into(),
            reason,
        })?;
    let manifest: SharedManifest = serde_json::from_slice(
        &tokio::fs::read(&local)
            .await
            .map_err(|e| io("the manifest", e))?,
    )
    .map_err(|e| TransferError::Refused(format!("/shared: the manifest: {e}")))?;
    // Bytes of the objects fetched (the manifest aside).
    let mut fetched = 0u64;
    let mut placed: HashSet<String> = HashSet::new();
    for o in &objects {
        let files: Vec<SharedFile> = manifest
            .files
            .iter()
            .filter(|f| f.object == o.path && !cache.has(&f.blake3))
            .cloned()
            .collect();
        if files.is_empty() {
            continue;
        }
        let local = fetch_dir.join(o.path.replace('/', "-"));
        transfers
            .mover()
            .download(&o.url, &local, o.size)
            .await
            .map_err(|reason| TransferError::Input {
                object: format!("/shared {}", o.path),
                reason,
            })?;
        fetched += o.size;
        let (l, d, fs) = (local.clone(), dir.to_owned(), files.clone());
        tokio::task::spawn_blocking(move || place_from(&l, &fs, &d))
            .await
            .map_err(|e| TransferError::Refused(e.to_string()))??;
        placed.extend(files.into_iter().map(|f| f.path));
        let _ = tokio::fs::remove_file(&local).await;
    }
    let _ = tokio::fs::remove_dir_all(&fetch_dir).await;
    let (c, d) = (cache.clone(), dir.to_owned());
    let base = tokio::task::spawn_blocking(move || {
        for f in manifest.files.iter().filter(|f| !placed.contains(&f.path)) {
            let dest = inside(&d, &f.path).map_err(TransferError::Refused)?;
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(&f.path, e))?;
            }
            c.copy_out(&f.blake3, &dest).map_err(|e| io(&f.path, e))?;
        }
        Base::of(&d, manifest)
    })
    .await
    .map_err(|e| TransferError::Refused(e.to_string()))??;
    Ok((base, fetched))
}

impl Base {
    /// The folder `dir` holding `manifest`'s files, as placed there: modes
    /// set, sizes and modification times noted.
    fn of(dir: &Path, manifest: SharedManifest) -> Result<Self, TransferError> {
        let mut placed = HashMap::with_capacity(manifest.files.len());
        for f in &manifest.files {
            let dest = inside(dir, &f.path).map_err(TransferError::Refused)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode & 0o7777))
                .map_err(|e| io(&f.path, e))?;
            let meta = std::fs::metadata(&dest).map_err(|e| io(&f.path, e))?;
            placed.insert(f.path.clone(), (f.clone(), meta.len(), mtime_ns(&meta)));
        }
        Ok(Self { manifest, placed })
    }
}

/// What saving found: the manifest, and the objects it names that were
/// made now (with the local file that holds each).
struct Scan {
    manifest: SharedManifest,
    objects: Vec<(OutputFile, PathBuf)>,
    bytes: u64,
}

/// Every regular file below `dir`, relative to it. Links are never followed.
fn files_below(dir: &Path) -> std::io::Result<Vec<(String, PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&path)?.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if meta.is_dir() {
                stack.push((entry.path(), rel));
            } else if meta.is_file() {
                out.push((rel, entry.path(), meta));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn scan(
    dir: &Path,
    base: &Base,
    task: TaskId,
    cache: &Cache,
    packs_dir: &Path,
) -> Result<Scan, TransferError> {
    let found = files_below(dir).map_err(|e| io("reading the folder", e))?;
    // Where bytes already are in the store, by hash.
    let mut known: HashMap<String, (String, u64)> = base
        .manifest
        .files
        .iter()
        .map(|f| (f.blake3.clone(), (f.object.clone(), f.offset)))
        .collect();
    let mut files = Vec::with_capacity(found.len());
    // Small new files to pack (one per content), and the other files with
    // the same content as one of them.
    let mut small: Vec<(usize, PathBuf)> = Vec::new();
    let mut small_by_hash: HashMap<String, usize> = HashMap::new();
    let mut copies: Vec<(usize, usize)> = Vec::new();
    let mut objects = Vec::new();
    let mut present = HashSet::with_capacity(found.len());
    let mut bytes = 0u64;
    for (rel, path, meta) in found {
        if ud_schemas::spec::relative_path(&rel).is_err() {
            warn!(path = %rel, "a /shared path that cannot be kept is left out");
            continue;
        }
        present.insert(rel.clone());
        let mode = meta.mode() & 0o7777;
        let before = base.placed.get(&rel);
        // Left as it was put there: the same entry (no reading).
        if let Some((f, size, mtime)) = before {
            if *size == meta.len() && *mtime == mtime_ns(&meta) && f.mode & 0o7777 == mode {
                cache.keep(&path, &f.blake3).map_err(|e| io(&rel, e))?;
                files.push(f.clone());
                continue;
            }
        }
        let hash = blake3_of(&path).map_err(|e| io(&rel, e))?;
        cache.keep(&path, &hash).map_err(|e| io(&rel, e))?;
        if let Some((f, _, _)) =
            before.filter(|(f, _, _)| f.blake3 == hash && f.mode & 0o7777 == mode)
        {
            files.push(f.clone());
            continue;
        }
        let mut entry = SharedFile {
            path: rel,
            mode,
            size: meta.len(),
            blake3: hash.clone(),
            object: String::new(),
            offset: 0,
            writer: task,
        };
        if let Some((object, offset)) = known.get(&hash) {
            entry.object = object.clone();
            entry.offset = *offset;
        } else if meta.len() >= LARGE {
            entry.object = format!("blobs/{hash}");
            known.insert(hash, (entry.object.clone(), 0));
            objects.push((
                OutputFile {
                    path: entry.object.clone(),
                    size: meta.len(),
                    sha256: String::new(),
                    upload_id: None,
                },
                path,
            ));
            bytes += meta.len();
        } else if let Some(&first) = small_by_hash.get(&hash) {
            copies.push((files.len(), first));
        } else {
            small_by_hash.insert(hash, files.len());
            small.push((files.len(), path));
        }
        files.push(entry);
    }
    // Small new files, packed in order: each pack named by its own hash.
    let mut at = 0;
    while at < small.len() {
        std::fs::create_dir_all(packs_dir).map_err(|e| io("packing", e))?;
        let tmp = packs_dir.join(format!("pack-{}", rand::random::<u64>()));
        let mut pack =
            std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io("packing", e))?);
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut members = Vec::new();
        while at < small.len() && (size == 0 || size + files[small[at].0].size <= PACK_MAX) {
            let (i, path) = &small[at];
            let bytes_of = std::fs::read(path).map_err(|e| io(&files[*i].path, e))?;
            pack.write_all(&bytes_of).map_err(|e| io("packing", e))?;
            hasher.update(&bytes_of);
            files[*i].offset = size;
            size += bytes_of.len() as u64;
            members.push(*i);
            at += 1;
        }
        pack.flush().map_err(|e| io("packing", e))?;
        let object = format!("packs/{}", hasher.finalize().to_hex());
        for i in members {
            files[i].object = object.clone();
        }
        let local = packs_dir.join(object.replace('/', "-"));
        std::fs::rename(&tmp, &local).map_err(|e| io("packing", e))?;
        bytes += size;
        objects.push((
            OutputFile {
                path: object,
                size,
                sha256: String::new(),
                upload_id: None,
            },
            local,
        ));
    }
    for (copy, first) in copies {
        files[copy].object = files[first].object.clone();
        files[copy].offset = files[first].offset;
    }
    // Deleted: what was there and is not, and what was deleted before and
    // is still not there.
    let mut deleted: Vec<SharedDeleted> = base
        .manifest
        .deleted
        .iter()
        .filter(|d| !present.contains(&d.path))
        .cloned()
        .collect();
    deleted.extend(
        base.manifest
            .files
            .iter()
            .filter(|f| !present.contains(&f.path))
            .map(|f| SharedDeleted {
                path: f.path.clone(),
                writer: task,
            }),
    );
    Ok(Scan {
        manifest: SharedManifest {
            files,
            deleted,
            ancestors: Vec::new(),
        },
        objects,
        bytes,
    })
}

/// What saving did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub files: usize,
    /// Bytes in objects made by this run (sent only where the store lacked them).
    pub new_bytes: u64,
}

/// Saves the run's `/shared` in `dir`, measured against `base`.
pub async fn save(
    transfers: &Transfers,
    cache: &Cache,
    task: TaskId,
    attempt: u32,
    dir: &Path,
    base: &Base,
) -> Result<Saved, TransferError> {
    let packs_dir = dir.with_extension("packs");
    let (d, b, c, p) = (
        dir.to_owned(),
        base.clone(),
        cache.clone(),
        packs_dir.clone(),
    );
    let found = tokio::task::spawn_blocking(move || scan(&d, &b, task, &c, &p))
        .await
        .map_err(|e| TransferError::Refused(e.to_string()))?;
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&packs_dir).await;
            return Err(e);
        }
    };
    let saved = Saved {
        files: found.manifest.files.len(),
        new_bytes: found.bytes,
    };
    // The manifest goes to the store beside the objects: it may be far
    // larger than a message.
    let mut objects = found.objects;
    let written = async {
        let json = serde_json::to_vec(&found.manifest)
            .map_err(|e| TransferError::Refused(format!("/shared: the manifest: {e}")))?;
        tokio::fs::create_dir_all(&packs_dir)
            .await
            .map_err(|e| io("the manifest", e))?;
        let local = packs_dir.join(SHARED_MANIFEST);
        tokio::fs::write(&local, &json)
            .await
            .map_err(|e| io("the manifest", e))?;
        Ok::<_, TransferError>((json.len() as u64, local))
    }
    .await;
    let sent = match written {
        Ok((size, local)) => {
            objects.push((
                OutputFile {
                    path: SHARED_MANIFEST.into(),
                    size,
                    sha256: String::new(),
                    upload_id: None,
                },
                local,
            ));
            transfers
                .send(
                    &objects,
                    |objects| StorageRequest::SharedPlan {
                        task_id: task,
                        attempt,
                        objects,
                    },
                    |objects| StorageRequest::SharedSave {
                        task_id: task,
                        attempt,
                        objects,
                    },
                )
                .await
        }
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_dir_all(&packs_dir).await;
    sent?;
    let c = cache.clone();
    if let Ok(Ok(freed)) = tokio::task::spawn_blocking(move || c.evict()).await {
        if freed > 0 {
            info!(freed, "shared cache evicted");
        }
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, bytes: &[u8]) {
        let path = dir.join(rel);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).unwrap_or_default();
        }
        std::fs::write(path, bytes).unwrap_or_default();
    }

    /// Places a scan's files in `dir` from the objects of it and the scans
    /// before it, as a restore on another node does.
    fn place(scan: &Scan, dir: &Path, earlier: &[&Scan]) -> Result<Base, TransferError> {
        for (object, local) in earlier.iter().chain([&scan]).flat_map(|s| &s.objects) {
            let files: Vec<SharedFile> = scan
                .manifest
                .files
                .iter()
                .filter(|f| f.object == object.path)
                .cloned()
                .collect();
            place_from(local, &files, dir)?;
        }
        Base::of(dir, scan.manifest.clone())
    }

    #[test]
    fn a_folder_is_saved_as_packs_and_blobs_and_only_changes_are_new() -> Result<(), TransferError>
    {
        let tmp = tempfile::tempdir().map_err(|e| io("tmp", e))?;
        let root = tmp.path();
        let (first, second) = (TaskId::new(), TaskId::new());
        let cache = Cache::new(root.join("cache"), 1024);
        let a = root.join("a");
        write(&a, "small.txt", b"hello");
        write(&a, "copy.txt", b"hello");
        write(&a, "sub/keep.txt", b"kept as it is");
        write(&a, "sub/gone.txt", b"deleted later");
        let big: Vec<u8> = (0..(LARGE + 17)).map(|i| (i % 251) as u8).collect();
        write(&a, "big.bin", &big);
        let saved = scan(&a, &Base::default(), first, &cache, &root.join("packs-a"))?;
        let kinds: Vec<&str> = saved.objects.iter().map(|(o, _)| &o.path[..5]).collect();
        assert_eq!(kinds, ["blobs", "packs"]);
        // The same bytes twice are packed once.
        let pack = &saved.objects[1].0;
        assert_eq!(pack.size, 5 + 13 + 13);
        let copy = saved.manifest.files.iter().find(|f| f.path == "copy.txt");
        let small = saved.manifest.files.iter().find(|f| f.path == "small.txt");
        assert_eq!(copy.map(|f| f.offset), small.map(|f| f.offset));
        assert!(saved.manifest.files.iter().all(|f| f.writer == first));
        assert!(cache.has(&blake3::hash(&big).to_hex()));

        // Put together elsewhere, then changed: one file edited, one gone,
        // one new; only the change makes an object.
        let b = root.join("b");
        let base = place(&saved, &b, &[])?;
        assert_eq!(std::fs::read(b.join("big.bin")).unwrap_or_default(), big);
        write(&b, "small.txt", b"HELLO");
        std::fs::remove_file(b.join("sub/gone.txt")).map_err(|e| io("rm", e))?;
        write(&b, "new.txt", b"new");
        let again = scan(&b, &base, second, &cache, &root.join("packs-b"))?;
        assert_eq!(again.objects.len(), 1);
        assert_eq!(again.objects[0].0.size, 5 + 3);
        let by_path: HashMap<&str, &SharedFile> = again
            .manifest
            .files
            .iter()
            .map(|f| (f.path.as_str(), f))
            .collect();
        assert_eq!(by_path["big.bin"].writer, first);
        assert_eq!(by_path["sub/keep.txt"].writer, first);
        assert_eq!(by_path["small.txt"].writer, second);
        assert_eq!(by_path["copy.txt"].object, by_path["sub/keep.txt"].object);
        let deleted: Vec<&str> = again
            .manifest
            .deleted
            .iter()
            .map(|d| d.path.as_str())
            .collect();
        assert_eq!(deleted, ["sub/gone.txt"]);

        // Nothing changed: nothing new at all.
        let c = root.join("c");
        let base = place(&again, &c, &[&saved])?;
        let unchanged = scan(&c, &base, TaskId::new(), &cache, &root.join("packs-c"))?;
        assert!(unchanged.objects.is_empty());
        assert_eq!(unchanged.bytes, 0);
        Ok(())
    }

    #[test]
    fn a_damaged_object_is_refused() -> Result<(), TransferError> {
        let tmp = tempfile::tempdir().map_err(|e| io("tmp", e))?;
        let root = tmp.path();
        let cache = Cache::new(root.join("cache"), 1024);
        write(&root.join("a"), "x.txt", b"right");
        let saved = scan(
            &root.join("a"),
            &Base::default(),
            TaskId::new(),
            &cache,
            &root.join("p"),
        )?;
        std::fs::write(&saved.objects[0].1, b"wrong").map_err(|e| io("w", e))?;
        let placed = place(&saved, &root.join("b"), &[]);
        assert!(matches!(placed, Err(TransferError::Refused(r)) if r.contains("does not match")));
        Ok(())
    }
}
