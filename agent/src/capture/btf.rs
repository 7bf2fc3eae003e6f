//! Just enough of a BTF reader to find struct member offsets and enum values
//! in the running kernel's `/sys/kernel/btf/vmlinux`.
//!
//! aya parses BTF too but keeps its type walk private; the few hundred bytes
//! of format handled here are stable kernel ABI (Documentation/bpf/btf.rst).

use std::collections::HashMap;

use super::CaptureError;

const MAGIC: u16 = 0xeb9f;

mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: String,
    /// Size in bytes for INT/STRUCT/UNION/ENUM, referenced type otherwise.
    size_or_type: u32,
    members: Vec<Member>,
    enum_values: Vec<(String, i64)>,
    array_len: u32,
}

/// Parsed kernel BTF, indexed by type name for the lookups the loader needs.
pub struct Btf {
    types: Vec<Type>,
    by_name: HashMap<(u32, String), u32>,
}

fn err(msg: impl Into<String>) -> CaptureError {
    CaptureError::Btf(msg.into())
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, CaptureError> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| err("type section truncated"))?;
        self.pos += 4;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }
}

impl Btf {
    pub fn from_kernel() -> Result<Self, CaptureError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| err(format!("reading {path}: {e}")))?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, CaptureError> {
        let header = |at: usize| -> Result<u32, CaptureError> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| err("header truncated"))
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(err("not little-endian BTF (bad magic)"));
        }
        let hdr_len = header(4)? as usize;
        let (type_off, type_len) = (header(8)? as usize, header(12)? as usize);
        let (str_off, str_len) = (header(16)? as usize, header(20)? as usize);
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or_else(|| err("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| err("string section out of bounds"))?;
        let string_at = |off: u32| -> String {
            let tail = strings.get(off as usize..).unwrap_or_default();
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            String::from_utf8_lossy(&tail[..end]).into_owned()
        };

        // Type id 0 is `void`.
        let mut types = vec![Type {
            kind: 0,
            name: String::new(),
            size_or_type: 0,
            members: vec![],
            enum_values: vec![],
            array_len: 0,
        }];
        let mut r = Reader { data: types_bytes, pos: 0 };
        while r.pos < types_bytes.len() {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let vlen = info & 0xffff;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                kind,
                name: string_at(name_off),
                size_or_type,
                members: vec![],
                enum_values: vec![],
                array_len: 0,
            };
            match kind {
                kind::INT | kind::VAR | kind::DECL_TAG => {
                    r.u32()?;
                }
                kind::ARRAY => {
                    let elem = r.u32()?;
                    let _index = r.u32()?;
                    t.array_len = r.u32()?;
                    t.size_or_type = elem;
                }
                kind::STRUCT | kind::UNION => {
                    for _ in 0..vlen {
                        let name = string_at(r.u32()?);
                        let type_id = r.u32()?;
                        let off = r.u32()?;
                        let bit_offset = if kind_flag { off & 0x00ff_ffff } else { off };
                        t.members.push(Member { name, type_id, bit_offset });
                    }
                }
                kind::ENUM => {
                    for _ in 0..vlen {
                        let name = string_at(r.u32()?);
                        let value = r.u32()? as i32 as i64;
                        t.enum_values.push((name, value));
                    }
                }
                kind::ENUM64 => {
                    for _ in 0..vlen {
                        let name = string_at(r.u32()?);
                        let lo = r.u32()? as u64;
                        let hi = r.u32()? as u64;
                        t.enum_values.push((name, (hi << 32 | lo) as i64));
                    }
                }
                kind::FUNC_PROTO => {
                    for _ in 0..vlen {
                        r.u32()?;
                        r.u32()?;
                    }
                }
                kind::DATASEC => {
                    for _ in 0..vlen {
                        r.u32()?;
                        r.u32()?;
                        r.u32()?;
                    }
                }
                0..=19 => {}
                other => return Err(err(format!("unknown BTF kind {other}"))),
            }
            types.push(t);
        }
        let mut by_name = HashMap::new();
        for (id, t) in types.iter().enumerate() {
            if !t.name.is_empty() {
                by_name.entry((t.kind, t.name.clone())).or_insert(id as u32);
            }
        }
        Ok(Self { types, by_name })
    }

    fn get(&self, id: u32) -> Result<&Type, CaptureError> {
        self.types.get(id as usize).ok_or_else(|| err(format!("type id {id} out of range")))
    }

    /// Follows typedef/const/volatile/restrict/type-tag to the real type.
    fn resolve(&self, mut id: u32) -> Result<u32, CaptureError> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(err("type chain too long"))
    }

    fn size_of(&self, id: u32) -> Result<u32, CaptureError> {
        let t = self.get(self.resolve(id)?)?;
        match t.kind {
            kind::PTR => Ok(8),
            kind::INT | kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 => Ok(t.size_or_type),
            kind::ARRAY => Ok(self.size_of(t.size_or_type)? * t.array_len),
            other => Err(err(format!("no size for kind {other}"))),
        }
    }

    /// Finds `name` among the members of struct/union `id`, looking through
    /// anonymous struct/union members. Returns (byte offset, member type).
    fn member(&self, id: u32, name: &str) -> Result<Option<(u32, u32)>, CaptureError> {
        let t = self.get(self.resolve(id)?)?;
        for m in &t.members {
            if m.name == name {
                return Ok(Some((m.bit_offset, m.type_id)));
            }
            if m.name.is_empty() {
                if let Some((inner, ty)) = self.member(m.type_id, name)? {
                    return Ok(Some((m.bit_offset + inner, ty)));
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of a dotted member path, e.g. `("bio", "bi_iter.bi_sector")`,
    /// checked to have `expected_size` bytes (so a kernel that changed the
    /// field's width is refused instead of read wrongly).
    pub fn offset_of(&self, structure: &str, path: &str, expected_size: u32) -> Result<u32, CaptureError> {
        let mut id = *self
            .by_name
            .get(&(kind::STRUCT, structure.to_string()))
            .ok_or_else(|| err(format!("struct {structure} not in kernel BTF")))?;
        let mut bits = 0u32;
        for part in path.split('.') {
            let (off, ty) = self
                .member(id, part)?
                .ok_or_else(|| err(format!("{structure}.{path}: no member {part}")))?;
            bits += off;
            id = ty;
        }
        if !bits.is_multiple_of(8) {
            return Err(err(format!("{structure}.{path} is a bitfield")));
        }
        let size = self.size_of(id)?;
        if size != expected_size {
            return Err(err(format!("{structure}.{path} is {size} bytes, expected {expected_size}")));
        }
        Ok(bits / 8)
    }

    /// All variants of the named enum (`enum req_op`), as (name, value).
    pub fn enum_values(&self, name: &str) -> Result<&[(String, i64)], CaptureError> {
        let id = self
            .by_name
            .get(&(kind::ENUM, name.to_string()))
            .or_else(|| self.by_name.get(&(kind::ENUM64, name.to_string())))
            .ok_or_else(|| err(format!("enum {name} not in kernel BTF")))?;
        Ok(&self.get(*id)?.enum_values)
    }
}
