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
