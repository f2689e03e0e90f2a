{{/* Names and labels shared by every template. */}}
{{- define "facerec.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "facerec.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "facerec.labels" -}}
{{ include "facerec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "facerec.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The Secret holding FACEREC_API_KEYS, and its key. Without keys every replica would make its own
     random key, and no client could use the Service: refuse to render. */}}
{{- define "facerec.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "facerec.fullname" .) -}}
{{- else -}}
{{- fail (cat "apiKeys: set apiKeys.keys (>= 16 characters each) or apiKeys.existingSecret;"
              "without them every replica would generate its own random key") -}}
{{- end -}}
{{- end -}}

{{- define "facerec.apiKeysSecretKey" -}}
{{- ternary .Values.apiKeys.existingSecretKey "FACEREC_API_KEYS" (ne .Values.apiKeys.existingSecret "") -}}
{{- end -}}

{{/* A setting as the service parses it: whole numbers without an exponent (values arrive as float64,
     and 10485760 would otherwise print as 1.048576e+07). */}}
{{- define "facerec.settingValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- printf "%d" (int64 .) -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
