//! containerd's config on the node: the `imports` line that makes it read Cocoon's drop-in,
//! added as `make setup` adds it (`scripts/containerd-imports.sh`), to the text alone, so that
//! the installer can keep the original bytes and give them back at uninstall.

/// The drop-in directory containerd is made to import, as the node sees it.
pub const DROPIN_DIR: &str = "/etc/containerd/conf.d";
/// The glob in the `imports` line.
pub const IMPORT_GLOB: &str = "/etc/containerd/conf.d/*.toml";

/// `text` (a containerd config) importing [`IMPORT_GLOB`]; None when it already does.
/// An existing one-line `imports` list gets the glob added first; otherwise an `imports` line
/// goes after the top-level `version`, or first: top-level keys must precede every table.
pub fn with_import(text: &str) -> Option<String> {
    if text.contains(IMPORT_GLOB) {
        return None;
    }
    let line = format!("imports = [\"{IMPORT_GLOB}\"]");
    let mut out = Vec::new();
    let mut done = false;
    for l in text.lines() {
        let key = l.trim_start();
        if !done && key.starts_with("imports") && key[7..].trim_start().starts_with('=') {
            if let Some(open) = l.find('[') {
                let (head, tail) = l.split_at(open + 1);
                let sep = if tail.trim_start().starts_with(']') {
                    ""
                } else {
                    ", "
                };
                out.push(format!("{head}\"{IMPORT_GLOB}\"{sep}{tail}"));
                done = true;
                continue;
            }
        }
        out.push(l.to_owned());
    }
    if !done {
        let at = out
            .iter()
            .position(|l| {
                let k = l.trim_start();
                k.starts_with("version") && k[7..].trim_start().starts_with('=')
            })
            .filter(|&v| !out[..v].iter().any(|l| l.trim_start().starts_with('[')))
            .map_or(0, |v| v + 1);
        out.insert(at, line);
    }
    let mut s = out.join("\n");
    if text.ends_with('\n') || text.is_empty() {
        s.push('\n');
    }
    Some(s)
}

/// A config for a node that has none: containerd's defaults plus the import.
pub fn fresh() -> String {
    format!("version = 2\nimports = [\"{IMPORT_GLOB}\"]\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_import_goes_after_version_or_into_the_list() {
        let plain = "version = 2\n\n[plugins]\n  x = 1\n";
        assert_eq!(
            with_import(plain).unwrap(),
            format!("version = 2\nimports = [\"{IMPORT_GLOB}\"]\n\n[plugins]\n  x = 1\n")
        );
        let listed = "version = 2\nimports = [\"/etc/other/*.toml\"]\n";
        assert_eq!(
            with_import(listed).unwrap(),
            format!("version = 2\nimports = [\"{IMPORT_GLOB}\", \"/etc/other/*.toml\"]\n")
        );
        let empty_list = "imports = []\n";
        assert_eq!(
            with_import(empty_list).unwrap(),
            format!("imports = [\"{IMPORT_GLOB}\"]\n")
        );
        let no_version = "[grpc]\n  address = \"x\"\n";
        assert!(with_import(no_version)
            .unwrap()
            .starts_with(&format!("imports = [\"{IMPORT_GLOB}\"]\n[grpc]")));
        // A `version` inside a table is not the top-level key.
        let late = "[x]\nversion = 3\n";
        assert!(with_import(late).unwrap().starts_with("imports"));
        assert_eq!(with_import(&with_import(plain).unwrap()), None);
    }
}
