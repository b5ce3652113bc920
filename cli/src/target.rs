//! Which pod a command names: a sandbox id, or a prefix of one that names a single pod
//! (as `docker` and `crictl` take them).

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::ps::endpoints;

/// The admin endpoint of the pod `name` names.
pub fn endpoint(state_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    pick(endpoints(state_dir), name, state_dir)
}

fn pick(all: Vec<(String, PathBuf)>, name: &str, state_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some((_, p)) = all.iter().find(|(id, _)| id == name) {
        return Ok(p.clone());
    }
    let matching: Vec<&(String, PathBuf)> =
        all.iter().filter(|(id, _)| id.starts_with(name)).collect();
    match matching.as_slice() {
        [(_, p)] if !name.is_empty() => Ok(p.clone()),
        [] | [_] => bail!(
            "no pod {name:?} in {} (`cocoon ps` lists them)",
            state_dir.display()
        ),
        many => bail!(
            "{name:?} names {} pods ({}); give more of the id",
            many.len(),
            many.iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_or_a_prefix_of_one_names_a_pod() {
        let all = vec![
            ("abc1".to_owned(), PathBuf::from("/s/abc1.admin.sock")),
            ("abc12".to_owned(), PathBuf::from("/s/abc12.admin.sock")),
            ("def".to_owned(), PathBuf::from("/s/def.admin.sock")),
        ];
        let d = Path::new("/s");
        assert_eq!(pick(all.clone(), "abc1", d).unwrap(), all[0].1);
        assert_eq!(pick(all.clone(), "d", d).unwrap(), all[2].1);
        let e = pick(all.clone(), "ab", d).unwrap_err().to_string();
        assert!(e.contains("2 pods") && e.contains("abc12"), "{e}");
        let e = pick(all.clone(), "x", d).unwrap_err().to_string();
        assert!(e.contains("cocoon ps"), "{e}");
        assert!(pick(all, "", d).is_err());
    }
}
