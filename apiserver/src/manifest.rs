//! Reading manifests (YAML or JSON, several documents per file, `List` kinds
//! unrolled) for the sandbox and the tests, with errors that name the file and
//! the document.

use std::path::Path;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("manifest {path}, document {index}: not valid YAML: {message}")]
    Parse {
        path: String,
        index: usize,
        message: String,
    },
    #[error("manifest {path}, document {index}: {message}")]
    Shape {
        path: String,
        index: usize,
        message: String,
    },
}

/// Parses every document in `text`; `path` is only for messages.
pub fn parse(path: &str, text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = index + 1;
        let v: Value = serde::Deserialize::deserialize(doc).map_err(|e| ManifestError::Parse {
            path: path.to_string(),
            index,
            message: e.to_string(),
        })?;
        if v.is_null() {
            continue; // empty document between `---` separators
        }
        let shape = |message: String| ManifestError::Shape {
            path: path.to_string(),
            index,
            message,
        };
        if !v.is_object() {
            return Err(shape(
                "a manifest must be a mapping with apiVersion, kind and metadata".into(),
            ));
        }
        for field in ["apiVersion", "kind"] {
            if !v.get(field).is_some_and(|f| f.is_string()) {
                return Err(shape(format!("missing {field}")));
            }
        }
        if v["kind"].as_str().is_some_and(|k| k.ends_with("List")) && v.get("items").is_some() {
            for item in v["items"].as_array().cloned().unwrap_or_default() {
                out.push(item);
            }
        } else {
            out.push(v);
        }
    }
    Ok(out)
}

/// Reads a file, or every `.yaml`, `.yml` and `.json` file of a directory in
/// name order.
pub fn load(path: &Path) -> Result<Vec<Value>, ManifestError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| ManifestError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|source| ManifestError::Read {
                path: path.display().to_string(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            out.extend(parse(&f.display().to_string(), &read(&f)?)?);
        }
        Ok(out)
    } else {
        parse(&path.display().to_string(), &read(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_and_lists() {
        let docs = parse("x", "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["kind"], "ConfigMap");
    }

    #[test]
    fn errors_name_file_and_document() {
        let e = parse("f.yaml", "apiVersion: v1\nkind: A\n---\nkind: [\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("manifest f.yaml, document 2: not valid YAML"),
            "{e}"
        );
        let e = parse("f.yaml", "apiVersion: v1\nmetadata: {}\n").unwrap_err();
        assert_eq!(e.to_string(), "manifest f.yaml, document 1: missing kind");
    }
}
