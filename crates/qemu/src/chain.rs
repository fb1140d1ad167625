//! Image chains that standby builds itself. A replicated image may carry any backing-file
//! name in its header; standby never lets QEMU follow one. Every image it opens on the DR
//! side is described here layer by layer, with the bottom layer's backing set to null.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "qcow2" => Some(Format::Qcow2),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub path: String,
    pub format: Format,
}

/// Layers, top first. The last one is the base and is opened without any backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub layers: Vec<Layer>,
}

impl Chain {
    pub fn single(path: &str, format: Format) -> Chain {
        Chain { layers: vec![Layer { path: path.into(), format }] }
    }

    /// A new chain with `top` stacked on this one.
    pub fn with_top(&self, path: &str) -> Chain {
        let mut layers = vec![Layer { path: path.into(), format: Format::Qcow2 }];
        layers.extend(self.layers.iter().cloned());
        Chain { layers }
    }

    /// The block-layer options that open exactly this chain.
    pub fn to_json(&self) -> Value {
        let mut node = Value::Null;
        for layer in self.layers.iter().rev() {
            let file = json!({"driver": "file", "filename": layer.path});
            node = match layer.format {
                Format::Qcow2 => json!({"driver": "qcow2", "file": file, "backing": node}),
                Format::Raw => json!({"driver": "raw", "file": file}),
            };
        }
        node
    }

    /// A `json:` filename for tools that take a file name.
    pub fn filename(&self) -> String {
        format!("json:{}", self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_json_has_explicit_null_backing() {
        let c = Chain::single("/dr/a.qcow2", Format::Qcow2).with_top("/dr/b.qcow2");
        let v = c.to_json();
        assert_eq!(v["file"]["filename"], "/dr/b.qcow2");
        assert_eq!(v["backing"]["file"]["filename"], "/dr/a.qcow2");
        assert!(v["backing"]["backing"].is_null());
        assert!(v["backing"].as_object().is_some_and(|o| o.contains_key("backing")));
    }
}
