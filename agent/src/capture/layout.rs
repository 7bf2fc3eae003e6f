//! Builds the programs' [`ProgramConfig`] from the running kernel: struct
//! offsets and `enum req_op` from BTF, classic record offsets from tracefs.

use std::path::Path;

use cbt_common::{EventKind, ProgramConfig};

use super::{btf::Btf, CaptureError};

/// How each `REQ_OP_*` name is treated. Names not listed here (zone
/// management, driver passthrough, anything newer than this code) are
/// unclassifiable: the device may have changed anywhere.
fn kind_of_op(name: &str) -> u8 {
    match name {
        "REQ_OP_READ" | "REQ_OP_FLUSH" | "REQ_OP_LAST" => 0,
        "REQ_OP_WRITE" => EventKind::Write as u8,
        "REQ_OP_DISCARD" => EventKind::Discard as u8,
        "REQ_OP_WRITE_ZEROES" => EventKind::WriteZeroes as u8,
        "REQ_OP_SECURE_ERASE" => EventKind::SecureErase as u8,
        "REQ_OP_ZONE_APPEND" => EventKind::ZoneAppend as u8,
        _ => EventKind::Unclassified as u8,
    }
}

/// The op table: every code the kernel names gets its kind; codes it does
/// not name are unclassifiable too (a conservative default).
pub fn op_table(ops: &[(String, i64)]) -> [u8; 256] {
    let mut table = [EventKind::Unclassified as u8; 256];
    for (name, value) in ops {
        if (0..256).contains(value) {
            table[*value as usize] = kind_of_op(name);
        }
    }
    table
}

/// Fills the BTF half of the config. Fails if any field is missing or has
/// an unexpected width: the agent then falls back to classic tracepoints.
pub fn fill_btf(cfg: &mut ProgramConfig, btf: &Btf) -> Result<(), CaptureError> {
    cfg.bio_opf = btf.offset_of("bio", "bi_opf", 4)?;
    cfg.bio_bdev = btf.offset_of("bio", "bi_bdev", 8)?;
    cfg.bio_sector = btf.offset_of("bio", "bi_iter.bi_sector", 8)?;
    cfg.bio_size = btf.offset_of("bio", "bi_iter.bi_size", 4)?;
    cfg.bdev_disk = btf.offset_of("block_device", "bd_disk", 8)?;
    cfg.disk_major = btf.offset_of("gendisk", "major", 4)?;
    cfg.disk_first_minor = btf.offset_of("gendisk", "first_minor", 4)?;
    cfg.disk_seq = btf.offset_of("gendisk", "diskseq", 8)?;
    cfg.rq_cmd_flags = btf.offset_of("request", "cmd_flags", 4)?;
    cfg.rq_q = btf.offset_of("request", "q", 8)?;
    cfg.queue_disk = btf.offset_of("request_queue", "disk", 8)?;
    cfg.rq_sector = btf.offset_of("request", "__sector", 8)?;
    cfg.queue_max_discard_segments = btf.offset_of("request_queue", "limits.max_discard_segments", 2)?;
    Ok(())
}

/// A field of a classic tracepoint record: (offset, size).
fn tracefs_field(format: &str, name: &str) -> Option<(u32, u32)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        let field = decl.rsplit(' ').next()?;
        let field = field.split('[').next()?;
        if field != name {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        Some((offset?, size?))
    })
}

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Reads `events/block/<event>/format` and returns the offsets of the named
/// fields, each checked against its expected minimum width.
fn event_offsets<const N: usize>(
    tracefs: &Path,
    event: &str,
    fields: [(&str, u32); N],
) -> Result<[u32; N], CaptureError> {
    let path = tracefs.join("events/block").join(event).join("format");
    let format = std::fs::read_to_string(&path)
        .map_err(|e| CaptureError::Tracefs(format!("reading {}: {e}", path.display())))?;
    let mut out = [0; N];
    for (slot, (name, min_size)) in out.iter_mut().zip(fields) {
        let (offset, size) = tracefs_field(&format, name)
            .ok_or_else(|| CaptureError::Tracefs(format!("{event}: no field {name}")))?;
        if size < min_size {
            return Err(CaptureError::Tracefs(format!("{event}.{name} is {size} bytes, need {min_size}")));
        }
        *slot = offset;
    }
    Ok(out)
}

/// Fills the classic-tracepoint half of the config.
pub fn fill_tracefs(cfg: &mut ProgramConfig, tracefs: &Path) -> Result<(), CaptureError> {
    [cfg.tp_bio_dev, cfg.tp_bio_sector, cfg.tp_bio_nr_sector, cfg.tp_bio_rwbs] = event_offsets(
        tracefs,
        "block_bio_queue",
        [("dev", 4), ("sector", 8), ("nr_sector", 4), ("rwbs", 4)],
    )?;
    [cfg.tp_rq_dev, cfg.tp_rq_nr_sector, cfg.tp_rq_rwbs] =
        event_offsets(tracefs, "block_rq_issue", [("dev", 4), ("nr_sector", 4), ("rwbs", 4)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracefs_format_lines() {
        let format = "name: block_bio_queue\n\
            \tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\
            \tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\
            \tfield:char rwbs[10];\toffset:28;\tsize:10;\tsigned:0;\n";
        assert_eq!(tracefs_field(format, "dev"), Some((8, 4)));
        assert_eq!(tracefs_field(format, "sector"), Some((16, 8)));
        assert_eq!(tracefs_field(format, "rwbs"), Some((28, 10)));
        assert_eq!(tracefs_field(format, "nr_sector"), None);
    }

    #[test]
    fn op_table_is_conservative() {
        let ops: Vec<(String, i64)> = [
            ("REQ_OP_READ", 0),
            ("REQ_OP_WRITE", 1),
            ("REQ_OP_FLUSH", 2),
            ("REQ_OP_DISCARD", 3),
            ("REQ_OP_WRITE_ZEROES", 9),
            ("REQ_OP_ZONE_RESET", 17),
            ("REQ_OP_DRV_OUT", 35),
            ("REQ_OP_SOMETHING_NEW", 40),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let t = op_table(&ops);
        assert_eq!(t[0], 0);
        assert_eq!(t[2], 0);
        assert_eq!(t[1], EventKind::Write as u8);
        assert_eq!(t[3], EventKind::Discard as u8);
        assert_eq!(t[9], EventKind::WriteZeroes as u8);
        for unknown in [17, 35, 40, 4, 200] {
            assert_eq!(t[unknown], EventKind::Unclassified as u8, "op {unknown}");
        }
    }
}
