//! Modules the guest loads only when its kernel asks for them (`request_module`): what a
//! privileged or NET_ADMIN container expects of a Linux host (bridges, veth pairs, tun,
//! VLANs, VXLAN, netfilter for iptables and nftables, traffic control). Debian's cloud kernel
//! builds all of them as modules; the agent, as the kernel's modprobe helper, loads them from
//! the index written here (`agent/src/modprobe.rs`).
//!
//! The set is curated: every module in it is kernel surface a container can reach by asking,
//! and each costs guest RAM in every pod (the files stay in the guest's root).

use std::collections::{BTreeMap, BTreeSet};

use crate::modules::{module_name, ModulesDep};
use crate::Result;

/// What the kernel may ask for, by module name; their dependencies come along.
pub const ON_DEMAND: &[&str] = &[
    // Links a container can create.
    "bridge",
    "br_netfilter",
    "veth",
    "tun",
    "dummy",
    "macvlan",
    "ipvlan",
    "vxlan",
    "8021q",
    "ifb",
    // iptables (legacy and nft-compat) and nftables, with the matches and targets that
    // CNI plugins, Docker-in-Docker and service proxies use.
    "ip_tables",
    "ip6_tables",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "iptable_raw",
    "ip6table_filter",
    "ip6table_nat",
    "ip6table_mangle",
    "nf_tables",
    "nft_chain_nat",
    "nft_ct",
    "nft_compat",
    "nft_nat",
    "nft_masq",
    "nft_reject_inet",
    "nft_fib_inet",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "xt_conntrack",
    "xt_MASQUERADE",
    "xt_addrtype",
    "xt_mark",
    "xt_comment",
    "xt_multiport",
    "xt_nat",
    "xt_tcpudp",
    "xt_state",
    "xt_REDIRECT",
    "xt_statistic",
    "ipt_REJECT",
    "ip6t_REJECT",
    // Traffic control, as CNI's bandwidth plugin and tc-redirect users need.
    "sch_htb",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
];

/// The on-demand modules as the image ships them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OnDemand {
    /// Module files (paths under the kernel's module directory) to put in the image.
    pub files: Vec<String>,
    /// The index the guest's modprobe reads: `module NAME REL…` (load order, dependencies
    /// first) and `alias PATTERN NAME` lines.
    pub index: String,
}

/// Plans the on-demand set from `modules.dep` and `modules.alias`. Modules the agent loads at
/// boot (`at_boot`, paths) are left out of every load order: they are there already.
/// The index names files as `prefix` + path (the kernel release's directory, relative to the
/// index's own).
pub fn plan(
    dep: &ModulesDep,
    aliases: &str,
    wanted: &[&str],
    at_boot: &[String],
    prefix: &str,
) -> Result<OnDemand> {
    let boot: BTreeSet<&str> = at_boot.iter().map(String::as_str).collect();
    let mut orders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut files = BTreeSet::new();
    for name in wanted {
        let closure = dep.load_order(&[name])?;
        // Every module of the closure gets a line of its own: the kernel may ask for a
        // dependency by its alias too.
        for (i, rel) in closure.iter().enumerate() {
            if boot.contains(rel.as_str()) {
                continue;
            }
            let order: Vec<String> = closure[..=i]
                .iter()
                .filter(|r| !boot.contains(r.as_str()) && is_dep_or_self(dep, rel, r))
                .map(|r| format!("{prefix}{r}"))
                .collect();
            files.insert(rel.clone());
            orders.entry(module_name(rel)).or_insert(order);
        }
    }
    let mut index = String::new();
    for (name, order) in &orders {
        index.push_str(&format!("module {name} {}\n", order.join(" ")));
    }
    for line in aliases.lines() {
        let mut f = line.split_whitespace();
        if let (Some("alias"), Some(pattern), Some(module)) = (f.next(), f.next(), f.next()) {
            if orders.contains_key(&module.replace('-', "_")) {
                index.push_str(&format!("alias {pattern} {module}\n"));
            }
        }
    }
    Ok(OnDemand {
        files: files.into_iter().collect(),
        index,
    })
}

/// Whether `candidate` is `module` itself or one of its (indirect) dependencies.
fn is_dep_or_self(dep: &ModulesDep, module: &str, candidate: &str) -> bool {
    candidate == module || dep.needs(module, candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/net/llc/llc.ko:
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/drivers/net/veth.ko:
kernel/drivers/virtio/virtio.ko:
";
    const ALIAS: &str = "alias rtnl-link-bridge bridge
alias rtnl-link-veth veth
alias pci:v00001AF4d* virtio_pci
";

    #[test]
    fn each_module_gets_its_own_load_order_and_aliases_of_the_set_only() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let p = plan(&dep, ALIAS, &["bridge", "veth"], &[], "").unwrap();
        assert_eq!(
            p.files,
            [
                "kernel/drivers/net/veth.ko",
                "kernel/net/802/stp.ko",
                "kernel/net/bridge/bridge.ko",
                "kernel/net/llc/llc.ko"
            ]
        );
        let lines: Vec<&str> = p.index.lines().collect();
        assert!(lines.contains(
            &"module bridge kernel/net/llc/llc.ko kernel/net/802/stp.ko kernel/net/bridge/bridge.ko"
        ));
        assert!(lines.contains(&"module llc kernel/net/llc/llc.ko"));
        assert!(lines.contains(&"module veth kernel/drivers/net/veth.ko"));
        assert!(lines.contains(&"alias rtnl-link-bridge bridge"));
        assert!(!p.index.contains("virtio_pci"), "{}", p.index);
    }

    #[test]
    fn modules_loaded_at_boot_are_neither_shipped_nor_loaded_again() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let p = plan(
            &dep,
            ALIAS,
            &["bridge"],
            &["kernel/net/llc/llc.ko".into()],
            "v/",
        )
        .unwrap();
        assert!(!p.files.contains(&"kernel/net/llc/llc.ko".to_owned()));
        assert!(p
            .index
            .contains("module bridge v/kernel/net/802/stp.ko v/kernel/net/bridge/bridge.ko\n"));
    }
}
