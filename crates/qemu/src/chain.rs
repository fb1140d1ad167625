//! Image chains as QEMU opens them. A replicated image may carry any backing-file name in
//! its header; standby never lets QEMU follow one. Every image it opens on the DR side is
//! described layer by layer, with the bottom layer's backing set to null.

use serde_json::{json, Value};
pub use standby_model::image::{Chain, Format, Layer};

/// The block-layer options that open exactly this chain.
pub fn chain_json(chain: &Chain) -> Value {
    let mut node = Value::Null;
    for layer in chain.layers.iter().rev() {
        let file = json!({"driver": "file", "filename": layer.path});
        node = match layer.format {
            Format::Qcow2 => json!({"driver": "qcow2", "file": file, "backing": node}),
            Format::Raw => json!({"driver": "raw", "file": file}),
        };
    }
    node
}

/// A `json:` filename for tools that take a file name.
pub fn chain_filename(chain: &Chain) -> String {
    format!("json:{}", chain_json(chain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_json_has_explicit_null_backing() {
        let c = Chain::single("/dr/a.qcow2", Format::Qcow2).with_top("/dr/b.qcow2");
        let v = chain_json(&c);
        assert_eq!(v["file"]["filename"], "/dr/b.qcow2");
        assert_eq!(v["backing"]["file"]["filename"], "/dr/a.qcow2");
        assert!(v["backing"]["backing"].is_null());
        assert!(v["backing"].as_object().is_some_and(|o| o.contains_key("backing")));
    }
}
