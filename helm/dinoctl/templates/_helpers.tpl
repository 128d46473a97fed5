{{/* Names, labels and shared pod settings for the dinoctl chart. */}}

{{- define "dinoctl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: 40 chars at most so that "<fullname>-<suffix>" stays a DNS label. */}}
{{- define "dinoctl.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dinoctl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; pass (dict "root" $ "component" "minio"). */}}
{{- define "dinoctl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dinoctl.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels. The part-of label is what the NetworkPolicies let through to MinIO and MLflow. */}}
{{- define "dinoctl.labels" -}}
helm.sh/chart: {{ include "dinoctl.chart" .root }}
{{ include "dinoctl.selectorLabels" . }}
app.kubernetes.io/part-of: dinoctl
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dinoctl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The small CPU image for hook and test pods: no multi-GB CUDA pull inside Helm's hook timeout. */}}
{{- define "dinoctl.hookImage" -}}
{{- $repo := default .Values.image.repository .Values.hooks.image.repository }}
{{- $tag := printf "%s-cpu" (default .Chart.AppVersion .Values.image.tag | trimSuffix "-cpu") }}
{{- printf "%s:%s" $repo (default $tag .Values.hooks.image.tag) }}
{{- end }}

{{- define "dinoctl.serviceAccountName" -}}
{{- default (printf "%s-submitter" (include "dinoctl.fullname" .)) .Values.serviceAccount.name }}
{{- end }}

{{/* True (non-empty) when the chart runs MinIO itself. */}}
{{- define "dinoctl.minioEnabled" -}}
{{- if and .Values.minio.enabled (not .Values.s3.external.endpoint) }}true{{ end }}
{{- end }}

{{- define "dinoctl.minioHost" -}}
{{- printf "%s-minio" (include "dinoctl.fullname" .) }}
{{- end }}

{{- define "dinoctl.mlflowHost" -}}
{{- printf "%s-mlflow" (include "dinoctl.fullname" .) }}
{{- end }}

{{- define "dinoctl.s3Endpoint" -}}
{{- if .Values.s3.external.endpoint }}
{{- .Values.s3.external.endpoint }}
{{- else }}
{{- printf "http://%s.%s.svc:9000" (include "dinoctl.minioHost" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (ours, or an existing one). */}}
{{- define "dinoctl.s3SecretName" -}}
{{- if .Values.s3.external.endpoint }}
{{- .Values.s3.external.existingSecret }}
{{- else if .Values.minio.existingSecret }}
{{- .Values.minio.existingSecret }}
{{- else }}
{{- printf "%s-s3" (include "dinoctl.fullname" .) }}
{{- end }}
{{- end }}

{{- define "dinoctl.settingsName" -}}
{{- printf "%s-settings" (include "dinoctl.fullname" .) }}
{{- end }}

{{- define "dinoctl.configsName" -}}
{{- printf "%s-configs" (include "dinoctl.fullname" .) }}
{{- end }}

{{/* Pod-level hardening shared by every pod (same as app/launch/render.py). */}}
{{- define "dinoctl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container hardening; the root filesystem is read-only and /tmp is an emptyDir. */}}
{{- define "dinoctl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* S3 credentials as secretKeyRef env entries (never literal values). */}}
{{- define "dinoctl.s3CredentialsEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ include "dinoctl.s3SecretName" . | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "dinoctl.s3SecretName" . | quote }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}

{{/* Endpoint settings from the settings ConfigMap. */}}
{{- define "dinoctl.settingsEnv" -}}
{{- $cm := include "dinoctl.settingsName" . }}
{{- range list "S3_ENDPOINT_URL" "MLFLOW_TRACKING_URI" "MLFLOW_EXPERIMENT_NAME" "DINOCTL_STORE" }}
- name: {{ . }}
  valueFrom:
    configMapKeyRef: {name: {{ $cm | quote }}, key: {{ . }}, optional: true}
{{- end }}
{{- end }}
