//! The guest's `modprobe`: kernel features a privileged or NET_ADMIN container asks for
//! (`brctl addbr`, `ip link add … type veth`, iptables, nftables) come as modules in Debian's
//! cloud kernel, and the kernel loads them on demand by running its modprobe helper with
//! `-q -- NAME`. The guest has no kmod, so the agent is that helper: the image builder ships a
//! curated set of such modules with an index (`ON_DEMAND_INDEX`: each module's load order and
//! the aliases the kernel asks by, from `modules.alias`), `init::switch_root` keeps them in the
//! guest's root, and points `/proc/sys/kernel/modprobe` at `/proc/1/exe`, the agent's image
//! (unlinked with the initramfs, still executable through its pid).
//!
//! Only modules in that set load: the guest is the boundary, but the kernel's attack surface
//! a container can reach by asking for a module stays what the image chose.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};

/// The index the image builder writes next to the modules.
pub const ON_DEMAND_INDEX: &str = "/lib/modules/on-demand";
/// What the kernel's helper path is set to.
pub const HELPER: &str = "/proc/1/exe";

/// The on-demand set: module name → its load order (dependencies first, then itself), and
/// the aliases (glob patterns, as in `modules.alias`) each is known by.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Index {
    modules: BTreeMap<String, Vec<String>>,
    aliases: Vec<(String, String)>,
}

impl Index {
    /// Lines `module NAME REL…` and `alias PATTERN NAME`.
    pub fn parse(text: &str) -> Index {
        let mut idx = Index::default();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            match f.next() {
                Some("module") => {
                    if let Some(name) = f.next() {
                        idx.modules
                            .insert(name.to_owned(), f.map(str::to_owned).collect());
                    }
                }
                Some("alias") => {
                    if let (Some(p), Some(m)) = (f.next(), f.next()) {
                        idx.aliases.push((p.to_owned(), m.replace('-', "_")));
                    }
                }
                _ => {}
            }
        }
        idx
    }

    /// Every file the index names (to keep in the guest's root).
    pub fn files(&self) -> std::collections::BTreeSet<&str> {
        self.modules
            .values()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// The files to load, in order, for what the kernel asked (a module name or an alias).
    pub fn resolve(&self, wanted: &str) -> Option<&[String]> {
        let as_name = wanted.replace('-', "_");
        if let Some(order) = self.modules.get(&as_name) {
            return Some(order);
        }
        self.aliases
            .iter()
            .find(|(pattern, _)| glob(pattern.as_bytes(), wanted.as_bytes()))
            .and_then(|(_, m)| self.modules.get(m))
            .map(Vec::as_slice)
    }
}

/// fnmatch(3) without flags: `*`, `?` and `[…]` (with `!`/`^` and ranges), as kmod matches
/// `modules.alias` patterns.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(b'['), Some(&c)) => {
            let Some(end) = p.iter().skip(2).position(|&b| b == b']').map(|i| i + 2) else {
                return p[0] == c && glob(&p[1..], &s[1..]);
            };
            let mut set = &p[1..end];
            let negate = matches!(set.first(), Some(b'!' | b'^'));
            if negate {
                set = &set[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= (set[i]..=set[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob(&p[end + 1..], &s[1..])
        }
        (Some(&a), Some(&b)) => a == b && glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// `cocoon-agent -q -- NAME` as the kernel runs it; never returns. Exit 0 once loaded, 1 for a
/// module outside the set or one that failed (the kernel then fails the request, as with no
/// such module).
pub fn main(args: &[String]) -> ! {
    let wanted: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let index = Index::parse(&std::fs::read_to_string(ON_DEMAND_INDEX).unwrap_or_default());
    let mut ok = !wanted.is_empty();
    for name in wanted {
        ok &= match index.resolve(name) {
            Some(order) => load(order).is_ok(),
            None => false,
        };
    }
    std::process::exit(if ok { 0 } else { 1 });
}

fn load(order: &[String]) -> Result<(), Errno> {
    let dir = Path::new(ON_DEMAND_INDEX)
        .parent()
        .unwrap_or(Path::new("/"));
    for rel in order {
        let file = std::fs::File::open(dir.join(rel)).map_err(|_| Errno::ENOENT)?;
        match finit_module(file.as_fd(), c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                // The kernel log is the guest console's: the host sees it there.
                eprintln!("cocoon-agent modprobe: load {rel}: {e}");
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Whether argv (after the binary) is the kernel's modprobe call: `-q -- NAME…`.
pub fn is_helper_call(args: &[String]) -> bool {
    args.first().map(String::as_str) == Some("-q") && args.get(1).map(String::as_str) == Some("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "module llc kernel/net/llc/llc.ko
module stp kernel/net/llc/llc.ko kernel/net/802/stp.ko
module bridge kernel/net/llc/llc.ko kernel/net/802/stp.ko kernel/net/bridge/bridge.ko
module nf_conntrack kernel/net/netfilter/nf_conntrack.ko
alias rtnl-link-bridge bridge
alias nf_conntrack-[0-9]* nf_conntrack
";

    #[test]
    fn names_and_aliases_resolve_to_load_orders() {
        let idx = Index::parse(INDEX);
        let bridge = idx.resolve("bridge").unwrap();
        assert_eq!(bridge.last().unwrap(), "kernel/net/bridge/bridge.ko");
        assert_eq!(bridge.len(), 3, "dependencies first");
        assert_eq!(idx.resolve("rtnl-link-bridge"), Some(bridge));
        assert!(idx.resolve("nf_conntrack-10").is_some());
        assert!(idx.resolve("nf-conntrack").is_some(), "- and _ alike");
        assert!(idx.resolve("dccp").is_none(), "outside the set");
        assert!(idx.resolve("rtnl-link-bridgex").is_none());
    }

    #[test]
    fn globs_match_as_fnmatch_does() {
        assert!(glob(b"net-pf-*", b"net-pf-10"));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"ac"));
        assert!(glob(b"x[0-9]y", b"x5y"));
        assert!(!glob(b"x[!0-9]y", b"x5y"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"abc", b"abcd"));
    }

    #[test]
    fn the_kernels_call_is_recognised() {
        let call = ["-q", "--", "bridge"].map(String::from);
        assert!(is_helper_call(&call));
        assert!(!is_helper_call(&["runner".into()]));
    }
}
