{{/* Chart name, overridable with nameOverride. */}}
{{- define "membrane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name: the release name when it already contains the chart name. */}}
{{- define "membrane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "membrane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names. */}}
{{- define "membrane.controller.name" -}}{{ include "membrane.fullname" . }}-ca{{- end -}}
{{- define "membrane.ztunnel.name" -}}{{ include "membrane.fullname" . }}-ztunnel{{- end -}}
{{- define "membrane.cni.name" -}}{{ include "membrane.fullname" . }}-cni{{- end -}}
{{/* The gateway kinds (the `membrane.dev/gateway` label values). */}}
{{- define "membrane.gateway.kinds" -}}egress ingress east-west{{- end -}}

{{/* A gateway kind's key under `gateways` in the values (east-west: eastWest). */}}
{{- define "membrane.gateway.key" -}}{{ if eq . "east-west" }}eastWest{{ else }}{{ . }}{{ end }}{{- end -}}

{{/* A gateway's objects. Call with (dict "ctx" $ "kind" "egress"). */}}
{{- define "membrane.gateway.name" -}}{{ include "membrane.fullname" .ctx }}-{{ .kind }}-gateway{{- end -}}
{{- define "membrane.trustRoot.name" -}}
{{- default (printf "%s-ca-root" (include "membrane.fullname" .)) .Values.trustRoot.configMap -}}
{{- end -}}

{{/* DNS name of the controller's Service; the ztunnels dial it and check it in the certificate. */}}
{{- define "membrane.controller.host" -}}
{{ include "membrane.controller.name" . }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* Labels of every object. Call with (dict "ctx" $ "component" "controller"). */}}
{{- define "membrane.labels" -}}
{{ include "membrane.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: membrane
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "membrane.chart" .ctx }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "membrane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "membrane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference. Call with (dict "ctx" $ "image" .Values.x.image "name" "ztunnel"). */}}
{{- define "membrane.image" -}}
{{- $repo := default (printf "%s/%s" .ctx.Values.image.registry .name) .image.repository -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default (default .ctx.Chart.AppVersion .ctx.Values.image.tag) .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Labels of a pod template: no chart version, so a chart release alone rolls no pod. */}}
{{- define "membrane.podLabels" -}}
{{ include "membrane.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: membrane
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Whether the controller signs with an operator's CA. */}}
{{- define "membrane.pluginCA" -}}
{{- if .Values.ca.pluginSecret }}true{{ end -}}
{{- end -}}

{{/* Checks that span several values; fails the render with the reason. */}}
{{- define "membrane.validate" -}}
{{- if and (not .Values.ca.pluginSecret) (gt (int .Values.controller.replicas) 1) -}}
{{- fail "controller.replicas > 1 needs a plug-in CA (ca.pluginSecret): a self-managed root is owned by one controller and its volume" -}}
{{- end -}}
{{- if and .Values.trustRoot.pem (not (contains "BEGIN CERTIFICATE" .Values.trustRoot.pem)) -}}
{{- fail "trustRoot.pem must hold PEM certificates (-----BEGIN CERTIFICATE-----)" -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9._-]+$" .Values.trustDomain) -}}
{{- fail (printf "trustDomain %q is not a valid SPIFFE trust domain (lower-case letters, digits, dots, dashes, underscores)" .Values.trustDomain) -}}
{{- end -}}
{{- end -}}
