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
What the controllers do in the namespaces they watch, and nothing more: read and update
JobClusters and DispyJobs (status by server-side apply, finalizers on DispyJobs), create and
delete node pods, create the headless Service and the generated Secret, keep outputs too large
for a status in ConfigMaps, and record Events. A ClusterRole with all namespaces watched,
otherwise a Role in each watched namespace.
*/}}
{{- define "dispy-operator.rules" -}}
- apiGroups: [dispy.io]
  resources: [jobclusters, dispyjobs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [dispy.io]
  resources: [jobclusters/status, dispyjobs/status]
  verbs: [get, patch, update]
- apiGroups: [dispy.io]
  resources: [jobclusters/finalizers, dispyjobs/finalizers]
  verbs: [update]
# DispyJobArrays: read, their finalizer (patch), status, and deleted after ttlSecondsAfterFinished
- apiGroups: [dispy.io]
  resources: [dispyjobarrays]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [dispy.io]
  resources: [dispyjobarrays/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
# spec.scheduler's Deployment: applied (create, patch) and removed; never listed or watched
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
