{{/* Chart name, shortened to fit a label value. */}}
{{- define "dispy-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name alone when it already contains the chart name, the chart name
alone when it starts with the release name (`helm install dispy` gives dispy-operator, not
dispy-dispy-operator), otherwise both.
*/}}
{{- define "dispy-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dispy-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dispy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "dispy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dispy-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dispy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dispy-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dispy-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "dispy-operator.nodeImage" -}}
{{- printf "%s:%s" .Values.nodeImage.repository (.Values.nodeImage.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "dispy-operator.leaseName" -}}
{{- default (include "dispy-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
What the controllers call in the namespaces they watch, and nothing more (e2e/tests/tests/rbac.rs
checks each verb against the API server's audit log): watch JobClusters and DispyJobs and patch
their finalizers and statuses (server-side apply), delete DispyJobs past their
ttlSecondsAfterFinished, create and delete node pods, apply the headless Service (an apply that
creates needs create), read or create the node Secret (never list or watch: Secrets are read
by name), read depends ConfigMaps and write the output and files ConfigMaps, list and write a
DispyJobArray's result ConfigMaps and its status, delete a DispyJobArray past its
ttlSecondsAfterFinished, apply and remove spec.scheduler's Deployment, Service and node-list
ConfigMap, and record Events
(events.k8s.io; patch counts a repeated one). The finalizers subresources are not called: the
OwnerReferencesPermissionEnforcement admission plugin asks for update on them when the operator
creates objects whose owner reference blocks the owner's deletion. A ClusterRole with all
namespaces watched, otherwise a Role in each watched namespace.
*/}}
{{- define "dispy-operator.rules" -}}
- apiGroups: [dispy.io]
  resources: [jobclusters, dispyjobs]
  verbs: [list, watch, patch]
- apiGroups: [dispy.io]
  resources: [dispyjobs]
  verbs: [delete]
- apiGroups: [dispy.io]
  resources: [jobclusters/status, dispyjobs/status]
  verbs: [patch]
- apiGroups: [dispy.io]
  resources: [jobclusters/finalizers, dispyjobs/finalizers]
  verbs: [update]
# DispyJobArrays: read, their finalizer (patch), status, and deleted after ttlSecondsAfterFinished
- apiGroups: [dispy.io]
  resources: [dispyjobarrays]
  verbs: [list, watch, patch, delete]
- apiGroups: [dispy.io]
  resources: [dispyjobarrays/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [create, patch, delete]
# spec.scheduler's Deployment: applied (create, patch) and removed; never listed or watched
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
- apiGroups: [""]
  resources: [configmaps]
  # list: a DispyJobArray's result ConfigMaps; delete: spec.scheduler's node list
  verbs: [get, list, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
