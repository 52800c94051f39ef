//! The field-by-field checks of one AuthorizationPolicy document ([`Checker`]): each
//! problem is an error or a warning at its field path, never a panic.

use super::*;

/// Whether a `when` key names an L7 attribute Istio knows (warning, not error).
fn is_l7_key(key: &str) -> bool {
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|inner| !inner.is_empty())
    };
    matches!(
        key,
        "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "remote.ip"
            | "connection.sni"
    ) || bracketed("request.headers[")
        || bracketed("request.auth.claims[")
        || key
            .strip_prefix("experimental.envoy.filters.")
            .is_some_and(|rest| !rest.is_empty())
}

pub(super) struct Checker<'a> {
    pub(super) document: Option<usize>,
    pub(super) label: Option<String>,
    pub(super) prefix: &'a str,
    pub(super) errors: Vec<PolicyError>,
    pub(super) warnings: Vec<Warning>,
    pub(super) action: Action,
}

impl Checker<'_> {
    pub(super) fn error(&mut self, path: String, problem: Problem) {
        self.errors.push(PolicyError {
            document: self.document,
            policy: self.label.clone(),
            path: format!("{}{path}", self.prefix),
            problem,
        });
    }

    pub(super) fn warn(&mut self, path: String, kind: WarningKind) {
        self.warnings.push(Warning {
            path: format!("{}{path}", self.prefix),
            kind,
        });
    }

    fn l7(&mut self, path: String, field: String, has_l7: &mut bool) {
        *has_l7 = true;
        let action = self.action;
        self.warn(path, WarningKind::L7Field { field, action });
    }

    pub(super) fn rule(&mut self, path: &str, rule: &model::Rule) -> Rule {
        let mut out = Rule::default();
        let mut has_l7 = false;
        if let Some(from) = &rule.from {
            if from.is_empty() {
                self.error(format!("{path}.from"), Problem::EmptyList("from"));
            }
            for (j, f) in from.iter().enumerate() {
                let p = format!("{path}.from[{j}]");
                out.from.push(self.source(&p, f, &mut has_l7));
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                self.error(format!("{path}.to"), Problem::EmptyList("to"));
            }
            for (j, t) in to.iter().enumerate() {
                let p = format!("{path}.to[{j}]");
                out.to.push(self.operation(&p, t, &mut has_l7));
            }
        }
        if let Some(when) = &rule.when {
            if when.is_empty() {
                self.error(format!("{path}.when"), Problem::EmptyList("when"));
            }
            for (j, c) in when.iter().enumerate() {
                let p = format!("{path}.when[{j}]");
                if let Some(c) = self.condition(&p, c, &mut has_l7) {
                    out.when.push(c);
                }
            }
        }
        out.has_l7 = has_l7;
        out
    }

    fn source(&mut self, path: &str, from: &model::From, has_l7: &mut bool) -> SourceMatch {
        let Some(s) = &from.source else {
            self.error(
                path.to_owned(),
                Problem::EmptyClause("`source` is required in a from entry"),
            );
            return SourceMatch::default();
        };
        let path = format!("{path}.source");
        let all = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.service_accounts,
            &s.not_service_accounts,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        ];
        if all.iter().all(|l| l.is_empty()) {
            self.error(
                path.clone(),
                Problem::EmptyClause("source must set at least one field"),
            );
        }
        for (field, list) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
        ] {
            if !list.is_empty() {
                self.l7(format!("{path}.{field}"), field.to_owned(), has_l7);
            }
        }
        SourceMatch {
            principals: Constraint {
                values: self.principals(&path, "principals", &s.principals),
                not_values: self.principals(&path, "notPrincipals", &s.not_principals),
            },
            namespaces: Constraint {
                values: self.namespaces(&path, "namespaces", &s.namespaces),
                not_values: self.namespaces(&path, "notNamespaces", &s.not_namespaces),
            },
            service_accounts: Constraint {
                values: self.service_accounts(&path, "serviceAccounts", &s.service_accounts),
                not_values: self.service_accounts(
                    &path,
                    "notServiceAccounts",
                    &s.not_service_accounts,
                ),
            },
            ip_blocks: Constraint {
                values: self.nets(&path, "ipBlocks", &s.ip_blocks),
                not_values: self.nets(&path, "notIpBlocks", &s.not_ip_blocks),
            },
            remote_ip_blocks: Constraint {
                values: self.nets(&path, "remoteIpBlocks", &s.remote_ip_blocks),
                not_values: self.nets(&path, "notRemoteIpBlocks", &s.not_remote_ip_blocks),
            },
        }
    }

    fn operation(&mut self, path: &str, to: &model::To, has_l7: &mut bool) -> OperationMatch {
        let Some(op) = &to.operation else {
            self.error(
                path.to_owned(),
                Problem::EmptyClause("`operation` is required in a to entry"),
            );
            return OperationMatch::default();
        };
        let path = format!("{path}.operation");
        let l7 = [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ];
        if op.ports.is_empty() && op.not_ports.is_empty() && l7.iter().all(|(_, l)| l.is_empty()) {
            self.error(
                path.clone(),
                Problem::EmptyClause("operation must set at least one field"),
            );
        }
        for (field, list) in l7 {
            if !list.is_empty() {
                self.l7(format!("{path}.{field}"), field.to_owned(), has_l7);
            }
        }
        OperationMatch {
            ports: Constraint {
                values: self.ports(&path, "ports", &op.ports),
                not_values: self.ports(&path, "notPorts", &op.not_ports),
            },
        }
    }

    fn condition(
        &mut self,
        path: &str,
        c: &model::Condition,
        has_l7: &mut bool,
    ) -> Option<Condition> {
        if c.key.is_empty() {
            self.error(
                format!("{path}.key"),
                Problem::EmptyClause("a when condition needs a key"),
            );
            return None;
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            self.error(path.to_owned(), Problem::NoConditionValues);
        }
        let (v, nv) = (&c.values, &c.not_values);
        let cond = match c.key.as_str() {
            "source.principal" => Condition::SourcePrincipal(Constraint {
                values: self.principals(path, "values", v),
                not_values: self.principals(path, "notValues", nv),
            }),
            "source.namespace" => Condition::SourceNamespace(Constraint {
                values: self.namespaces(path, "values", v),
                not_values: self.namespaces(path, "notValues", nv),
            }),
            "source.serviceAccount" => Condition::SourceServiceAccount(Constraint {
                values: self.service_accounts(path, "values", v),
                not_values: self.service_accounts(path, "notValues", nv),
            }),
            "source.ip" => Condition::SourceIp(Constraint {
                values: self.nets(path, "values", v),
                not_values: self.nets(path, "notValues", nv),
            }),
            "destination.ip" => Condition::DestinationIp(Constraint {
                values: self.nets(path, "values", v),
                not_values: self.nets(path, "notValues", nv),
            }),
            "destination.port" => Condition::DestinationPort(Constraint {
                values: self.ports(path, "values", v),
                not_values: self.ports(path, "notValues", nv),
            }),
            key if is_l7_key(key) => {
                self.l7(format!("{path}.key"), format!("when key {key}"), has_l7);
                return None;
            }
            key => {
                self.error(
                    format!("{path}.key"),
                    Problem::UnknownWhenKey(key.to_owned()),
                );
                return None;
            }
        };
        Some(cond)
    }

    /// Parses each item of a list, reporting failures at `path.field[i]`.
    fn each<T>(
        &mut self,
        path: &str,
        field: &str,
        items: &[String],
        mut parse: impl FnMut(&mut Self, &str, &str) -> Result<T, Problem>,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(items.len());
        for (i, raw) in items.iter().enumerate() {
            let item_path = format!("{path}.{field}[{i}]");
            match parse(self, &item_path, raw) {
                Ok(v) => out.push(v),
                Err(problem) => self.error(item_path, problem),
            }
        }
        out
    }

    fn principals(&mut self, path: &str, field: &str, items: &[String]) -> Vec<StringMatch> {
        self.each(path, field, items, |_, _, raw| {
            StringMatch::principal(raw).map_err(|reason| Problem::BadPrincipal {
                value: raw.to_owned(),
                reason,
            })
        })
    }

    fn namespaces(&mut self, path: &str, field: &str, items: &[String]) -> Vec<NamespaceMatch> {
        self.each(path, field, items, |_, _, raw| {
            NamespaceMatch::parse(raw).map_err(|reason| Problem::BadNamespace {
                value: raw.to_owned(),
                reason,
            })
        })
    }

    fn service_accounts(
        &mut self,
        path: &str,
        field: &str,
        items: &[String],
    ) -> Vec<ServiceAccountRef> {
        self.each(path, field, items, |_, _, raw| {
            raw.parse().map_err(|reason| Problem::BadServiceAccount {
                value: raw.to_owned(),
                reason,
            })
        })
    }

    fn nets(&mut self, path: &str, field: &str, items: &[String]) -> Vec<IpNet> {
        self.each(path, field, items, |cx, item_path, raw| {
            let parsed = IpNet::parse(raw).map_err(|reason| Problem::BadCidr {
                value: raw.to_owned(),
                reason,
            })?;
            if parsed.host_bits_cleared {
                cx.warn(
                    item_path.to_owned(),
                    WarningKind::HostBitsCleared {
                        value: raw.to_owned(),
                        network: parsed.net.to_string(),
                    },
                );
            }
            Ok(parsed.net)
        })
    }

    fn ports(&mut self, path: &str, field: &str, items: &[String]) -> Vec<u16> {
        self.each(path, field, items, |_, _, raw| {
            parse_port(raw).map_err(|reason| Problem::BadPort {
                value: raw.to_owned(),
                reason,
            })
        })
    }
}
