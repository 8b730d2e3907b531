{{- define "anneal.name" -}}anneal-operator{{- end -}}
{{- define "anneal.labels" -}}
app.kubernetes.io/name: {{ include "anneal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: anneal
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "anneal.selector" -}}
app.kubernetes.io/name: {{ include "anneal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "anneal.serviceAccountName" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.serviceAccount.name -}}
{{- end -}}
{{/* camelCase values key -> ANNEAL_OPERATOR_UPPER_SNAKE */}}
{{- define "anneal.envName" -}}
ANNEAL_OPERATOR_{{ regexReplaceAll "([a-z0-9])([A-Z])" . "${1}_${2}" | upper }}
{{- end -}}
{{/* The chart's own MLflow (mlflow.enabled), by its Service's cluster DNS name: Ray pods in any namespace reach it. */}}
{{- define "anneal.mlflowUri" -}}
http://{{ .Release.Name }}-mlflow.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.port }}
{{- end -}}
{{/* What the operator does in a namespace it watches (a Role there, or the ClusterRole). */}}
{{- define "anneal.operatorRules" -}}
- apiGroups: ["anneal.dev"]
  resources: [distillationjobs, compressionjobs, modelservices, modelpipelines]
  verbs: [get, list, watch, create, patch, update]
- apiGroups: ["anneal.dev"]
  resources: [distillationjobs/status, compressionjobs/status, modelservices/status, modelpipelines/status]
  verbs: [get, patch, update]
- apiGroups: ["ray.io"]
  resources: [rayjobs, rayservices]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: ["events.k8s.io"]
  resources: [events]
  verbs: [create, patch]
{{- with .Values.secretAccess.names }}
# Only these Secrets, only `get` (values.yaml, secretAccess): Ray takes values where no Secret reference can go.
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ toJson . }}
  verbs: [get]
{{- end }}
{{- end -}}
{{/* Host headers the chart's MLflow answers: its Service's names (any port), MLflow's defaults (loopback, private IPs), mlflow.allowedHosts. */}}
{{- define "anneal.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" .Release.Name -}}
{{- $hosts := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) -}}
{{- $all := list -}}
{{- range $hosts }}{{ $all = append $all . }}{{ $all = append $all (printf "%s:*" .) }}{{ end -}}
{{- $all = concat $all (list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" "10.*" "192.168.*") -}}
{{- range untilStep 16 32 1 }}{{ $all = append $all (printf "172.%d.*" .) }}{{ end -}}
{{- join "," (concat $all .Values.mlflow.allowedHosts) -}}
{{- end -}}
