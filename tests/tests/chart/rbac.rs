//! RBAC: no wildcards, the controller's rules exactly what it calls, no Kubernetes API access
//! for the ztunnel.

use super::*;

// ---------------------------------------------------------------------------------------------
// RBAC

#[test]
fn rbac_has_no_wildcards() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let roles: Vec<&Value> = r
            .all("Role")
            .into_iter()
            .chain(r.all("ClusterRole"))
            .collect();
        ensure!(!roles.is_empty(), "no roles rendered");
        for role in roles {
            let rules = role["rules"].as_array().context("rules")?;
            ensure!(
                !rules.is_empty(),
                "{} has no rules",
                role["metadata"]["name"]
            );
            for rule in rules {
                for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    ensure!(
                        !string_set(&rule[field]).iter().any(|s| s.contains('*')),
                        "wildcard in {field} of {}: {rule}",
                        role["metadata"]["name"]
                    );
                }
                ensure!(
                    rule["nonResourceURLs"].is_null(),
                    "non-resource URLs granted: {rule}"
                );
            }
        }
        for binding in r
            .all("ClusterRoleBinding")
            .into_iter()
            .chain(r.all("RoleBinding"))
        {
            ensure!(
                !matches!(
                    str_of(&binding["roleRef"]["name"]),
                    "cluster-admin" | "admin" | "edit"
                ),
                "binding to a built-in broad role: {binding}"
            );
        }
    }
    Ok(())
}

#[test]
fn controller_rbac_is_exactly_what_it_calls() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let deployment = r.deployment()?;
        let account = str_of(&pod_spec(deployment)["serviceAccountName"]).to_owned();
        ensure!(
            !account.is_empty(),
            "the controller names no ServiceAccount"
        );
        r.named("ServiceAccount", &account)?;

        // Cluster-wide: list+watch of what the reflectors mirror, status patches, TokenReview.
        let cluster_role = r.one("ClusterRole")?;
        let mut want = BTreeSet::new();
        for (group, resource) in [
            ("", "namespaces"),
            ("", "pods"),
            ("", "serviceaccounts"),
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("security.membrane.dev", "authorizationpolicies"),
            ("security.membrane.dev", "egresspolicies"),
            ("security.membrane.dev", "trustfederations"),
            ("gateway.networking.k8s.io", "gateways"),
            ("gateway.networking.k8s.io", "tcproutes"),
            ("gateway.networking.k8s.io", "tlsroutes"),
        ] {
            want.insert(grant(group, resource, "list", &[]));
            want.insert(grant(group, resource, "watch", &[]));
        }
        want.insert(grant(
            "security.membrane.dev",
            "authorizationpolicies/status",
            "patch",
            &[],
        ));
        want.insert(grant(
            "security.membrane.dev",
            "egresspolicies/status",
            "patch",
            &[],
        ));
        want.insert(grant(
            "authentication.k8s.io",
            "tokenreviews",
            "create",
            &[],
        ));
        assert_eq!(grants(cluster_role), want, "the controller's ClusterRole");

        // Namespaced: its status Lease only, in the namespace it is told to use.
        let container = container(deployment, "membrane-ca")?;
        let lease_ns = flag1(container, "status-lease-namespace")?;
        let role = r.one("Role")?;
        ensure!(
            role["metadata"]["namespace"] == lease_ns.as_str(),
            "Role not in {lease_ns}"
        );
        let want: BTreeSet<Grant> = [
            grant("coordination.k8s.io", "leases", "create", &[]),
            grant(
                "coordination.k8s.io",
                "leases",
                "get",
                &["membrane-ca-status"],
            ),
            grant(
                "coordination.k8s.io",
                "leases",
                "update",
                &["membrane-ca-status"],
            ),
        ]
        .into();
        assert_eq!(grants(role), want, "the controller's Role");

        // The bindings give exactly those roles to exactly the controller's account.
        for (binding_kind, role_kind, role_name) in [
            (
                "ClusterRoleBinding",
                "ClusterRole",
                &cluster_role["metadata"]["name"],
            ),
            ("RoleBinding", "Role", &role["metadata"]["name"]),
        ] {
            let binding = r.one(binding_kind)?;
            assert_eq!(binding["roleRef"]["kind"], role_kind);
            assert_eq!(&binding["roleRef"]["name"], role_name);
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]),
                "{binding_kind} subjects"
            );
        }
        ensure!(
            r.one("RoleBinding")?["metadata"]["namespace"] == role["metadata"]["namespace"],
            "the RoleBinding is not in the Role's namespace"
        );
    }
    Ok(())
}

#[test]
fn ztunnel_has_no_kubernetes_api_access() -> anyhow::Result<()> {
    let helm = need_helm!();
    for r in [defaults(&helm)?, custom(&helm)?] {
        let ds = r.daemonset()?;
        let spec = pod_spec(ds);
        let account = str_of(&spec["serviceAccountName"]).to_owned();
        let sa = r.named("ServiceAccount", &account)?;
        assert_eq!(
            sa["automountServiceAccountToken"], false,
            "ztunnel ServiceAccount"
        );
        assert_eq!(spec["automountServiceAccountToken"], false, "ztunnel pod");
        for binding in r
            .all("ClusterRoleBinding")
            .into_iter()
            .chain(r.all("RoleBinding"))
        {
            for subject in binding["subjects"].as_array().into_iter().flatten() {
                ensure!(
                    !(subject["kind"] == "ServiceAccount" && subject["name"] == account.as_str()),
                    "the ztunnel's account is bound by {}",
                    binding["metadata"]["name"]
                );
                ensure!(subject["kind"] != "Group", "a group is bound: {binding}");
            }
        }
        // No Secret volumes, and the one projected token is for the controller only.
        let mut tokens = Vec::new();
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            ensure!(
                volume["secret"].is_null(),
                "Secret mounted into the ztunnel: {volume}"
            );
            for source in volume["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
            {
                ensure!(source["secret"].is_null(), "projected Secret: {source}");
                if !source["serviceAccountToken"].is_null() {
                    tokens.push(&source["serviceAccountToken"]);
                }
            }
        }
        ensure!(
            tokens.len() == 1,
            "expected one projected token, found {tokens:?}"
        );
        let controller = container(r.deployment()?, "membrane-ca")?;
        assert_eq!(
            tokens[0]["audience"],
            flag1(controller, "token-audience")?.as_str(),
            "the ztunnel's token is for the controller's audience, not the API server's"
        );
    }
    Ok(())
}
