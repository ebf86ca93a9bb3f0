//! Image streams on an agent connection: a file is a `file` message, data frames, an end frame.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use crate::agent::{AgentError, bad, io_err};
use crate::protocol::{
    CHUNK, CheckpointStats, FileHeader, FileKind, FrameKind, ProtocolError, Request, Response,
    WorkloadSpec, read_frame, read_message, write_frame, write_message,
};
use crate::transport::Connection;

/// Receives [`Request::File`] items into `root` until [`Request::EndOfImages`]; data files are
/// appended to `incoming` as they arrive.
pub(crate) fn receive_files(
    conn: &mut dyn Connection,
    root: &Path,
    spec: &WorkloadSpec,
    incoming: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<(), AgentError> {
    loop {
        match read_message::<_, Request>(conn)? {
            Request::File(h) => incoming.extend(receive_file(conn, root, &h, spec)?),
            Request::EndOfImages => return Ok(()),
            other => return Err(bad(format!("unexpected {other:?} in an image stream"))),
        }
    }
}

/// Streams the regular files and symlinks of image directory `dir` as `prefix/<name>`.
pub(crate) fn stream_dir(
    conn: &mut dyn Connection,
    dir: &Path,
    prefix: &str,
    stats: &mut CheckpointStats,
) -> Result<(), AgentError> {
    let mut entries: Vec<_> = fs::read_dir(dir).map_err(io_err(dir))?.flatten().collect();
    entries.sort_by_key(fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") || name == "restore.pid" {
            continue;
        }
        let path = e.path();
        let ft = e.file_type().map_err(io_err(&path))?;
        let rel = format!("{prefix}/{name}");
        if ft.is_symlink() {
            let link = fs::read_link(&path).map_err(io_err(&path))?;
            let h = FileHeader {
                kind: FileKind::Symlink,
                name: rel,
                size: 0,
                mode: 0o777,
                link: Some(link.to_string_lossy().into_owned()),
            };
            write_message(conn, &Response::File(h))?;
            write_frame(conn, FrameKind::End, &[])?;
            stats.files += 1;
        } else if ft.is_file() {
            let before = stats.image_bytes;
            stream_file(conn, FileKind::Image, &rel, &path, stats)?;
            stats.image_bytes = before + fs::metadata(&path).map_err(io_err(&path))?.len();
        }
    }
    Ok(())
}

/// Streams one file: header, data frames, end frame.
pub(crate) fn stream_file(
    conn: &mut dyn Connection,
    kind: FileKind,
    name: &str,
    path: &Path,
    stats: &mut CheckpointStats,
) -> Result<(), AgentError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    let h = FileHeader {
        kind,
        name: name.into(),
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
        link: None,
    };
    write_message(conn, &Response::File(h))?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < meta.len() {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        let n = n.min(usize::try_from(meta.len() - sent).unwrap_or(usize::MAX));
        write_frame(conn, FrameKind::Data, &buf[..n])?;
        sent += n as u64;
    }
    if sent != meta.len() {
        return Err(io_err(path)(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file shrank while streaming",
        )));
    }
    write_frame(conn, FrameKind::End, &[])?;
    stats.files += 1;
    Ok(())
}

/// A relative image path with only normal components (no `..`, no root).
fn safe_relative(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    (!name.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_))))
        .then(|| p.to_path_buf())
}

/// Receives one streamed file; data files land next to their destination and are returned as
/// `(temporary, destination)` to be renamed at restore time.
fn receive_file(
    conn: &mut dyn Connection,
    root: &Path,
    h: &FileHeader,
    spec: &WorkloadSpec,
) -> Result<Option<(PathBuf, PathBuf)>, AgentError> {
    let (path, pending) = match h.kind {
        FileKind::Image | FileKind::Symlink => {
            let rel = safe_relative(&h.name)
                .ok_or_else(|| bad(format!("unsafe image path {:?}", h.name)))?;
            (root.join(rel), None)
        }
        FileKind::Data => {
            if !spec.data_files.contains(&h.name) {
                return Err(bad(format!(
                    "{:?} is not a data file of the workload",
                    h.name
                )));
            }
            let dst = PathBuf::from(&h.name);
            let tmp = PathBuf::from(format!("{}.mvga-incoming", h.name));
            (tmp.clone(), Some((tmp, dst)))
        }
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let _ = fs::remove_file(&path);
    if h.kind == FileKind::Symlink {
        let link = h
            .link
            .as_deref()
            .ok_or_else(|| bad("symlink without target"))?;
        symlink(link, &path).map_err(io_err(&path))?;
        expect_end(conn)?;
        return Ok(None);
    }
    let written = receive_contents(conn, &path, h);
    if written.is_err() {
        let _ = fs::remove_file(&path);
    }
    written.map(|()| pending)
}

/// Writes the data frames of one streamed file to `path`, checking the announced size.
fn receive_contents(
    conn: &mut dyn Connection,
    path: &Path,
    h: &FileHeader,
) -> Result<(), AgentError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    let mut got = 0u64;
    loop {
        let fr = read_frame(conn)?;
        match fr.kind {
            FrameKind::Data => {
                got += fr.payload.len() as u64;
                if got > h.size {
                    return Err(bad(format!(
                        "{}: more than the announced {} bytes",
                        h.name, h.size
                    )));
                }
                f.write_all(&fr.payload).map_err(io_err(path))?;
            }
            FrameKind::End => break,
            FrameKind::Message => {
                return Err(ProtocolError::Unexpected {
                    expected: "data or end",
                    got: fr.kind,
                }
                .into());
            }
        }
    }
    if got != h.size {
        return Err(bad(format!("{}: got {got} of {} bytes", h.name, h.size)));
    }
    f.set_permissions(fs::Permissions::from_mode(h.mode))
        .map_err(io_err(path))?;
    Ok(())
}

fn expect_end(conn: &mut dyn Connection) -> Result<(), AgentError> {
    let fr = read_frame(conn)?;
    if fr.kind != FrameKind::End {
        return Err(ProtocolError::Unexpected {
            expected: "end",
            got: fr.kind,
        }
        .into());
    }
    Ok(())
}
