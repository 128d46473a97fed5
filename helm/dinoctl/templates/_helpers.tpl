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

{{/* The services image (docker/Dockerfile.services: MLflow, SeaweedFS, python + minio client).
Pass (dict "root" $ "image" <an {repository, tag} override>): empty fields take the services
image's, whose own defaults are image.repository and <image tag or appVersion>-services. */}}
{{- define "dinoctl.servicesImageOf" -}}
{{- $v := .root.Values }}
{{- $repo := default (default $v.image.repository $v.services.image.repository) .image.repository }}
{{- $tag := printf "%s-services" (default .root.Chart.AppVersion $v.image.tag | trimSuffix "-cpu") }}
{{- printf "%s:%s" $repo (default (default $tag $v.services.image.tag) .image.tag) }}
{{- end }}

{{- define "dinoctl.servicesImage" -}}
{{- include "dinoctl.servicesImageOf" (dict "root" . "image" dict) }}
{{- end }}

{{/* Hook and test pods: the small services image (no multi-GB CUDA pull inside Helm's hook
timeout); hooks.image overrides its repository and/or tag. */}}
{{- define "dinoctl.hookImage" -}}
{{- include "dinoctl.servicesImageOf" (dict "root" . "image" .Values.hooks.image) }}
{{- end }}

{{/* The CPU image (dinoctl and the Kubernetes client, no CUDA): the pipeline driver. */}}
{{- define "dinoctl.cpuImage" -}}
{{- printf "%s:%s-cpu" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | trimSuffix "-cpu") }}
{{- end }}

{{/* The MLflow server image: the services image unless mlflow.image.repository is set. */}}
{{- define "dinoctl.mlflowImage" -}}
{{- if .Values.mlflow.image.repository }}
{{- printf "%s:%s" .Values.mlflow.image.repository (required "mlflow.image.tag is required with mlflow.image.repository" .Values.mlflow.image.tag) }}
{{- else }}
{{- include "dinoctl.servicesImage" . }}
{{- end }}
{{- end }}

{{- define "dinoctl.serviceAccountName" -}}
{{- default (printf "%s-submitter" (include "dinoctl.fullname" .)) .Values.serviceAccount.name }}
{{- end }}

{{/* The S3 server: seaweedfs or minio (the chart runs it), or external (s3.external.endpoint;
setting the endpoint alone also means external). */}}
{{- define "dinoctl.s3Server" -}}
{{- if .Values.s3.external.endpoint }}external
{{- else if eq .Values.s3.server "external" }}
{{- fail "s3.server=external needs s3.external.endpoint (and s3.external.existingSecret)" }}
{{- else }}{{ .Values.s3.server }}
{{- end }}
{{- end }}

{{/* True (non-empty) when the chart runs an S3 server itself (SeaweedFS or MinIO). */}}
{{- define "dinoctl.s3Bundled" -}}
{{- if ne (include "dinoctl.s3Server" .) "external" }}true{{ end }}
{{- end }}

{{/* Component label and name suffix of the bundled server: s3 (SeaweedFS) or minio. */}}
{{- define "dinoctl.s3Component" -}}
{{- if eq (include "dinoctl.s3Server" .) "minio" }}minio{{ else }}s3{{ end }}
{{- end }}

{{/* Service, StatefulSet and NetworkPolicy name of the bundled server. */}}
{{- define "dinoctl.s3Host" -}}
{{- printf "%s-%s" (include "dinoctl.fullname" .) (include "dinoctl.s3Component" .) }}
{{- end }}

{{- define "dinoctl.mlflowHost" -}}
{{- printf "%s-mlflow" (include "dinoctl.fullname" .) }}
{{- end }}

{{- define "dinoctl.s3Endpoint" -}}
{{- if .Values.s3.external.endpoint }}
{{- .Values.s3.external.endpoint }}
{{- else }}
{{- printf "http://%s.%s.svc:9000" (include "dinoctl.s3Host" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* An existing Secret with the S3 keys, named for the server in use, or empty. */}}
{{- define "dinoctl.s3ExistingSecret" -}}
{{- $server := include "dinoctl.s3Server" . }}
{{- if eq $server "external" }}{{ .Values.s3.external.existingSecret }}
{{- else if eq $server "minio" }}{{ .Values.minio.existingSecret }}
{{- else }}{{ .Values.seaweedfs.existingSecret }}
{{- end }}
{{- end }}

{{/* The Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (ours, or an existing one). */}}
{{- define "dinoctl.s3SecretName" -}}
{{- default (printf "%s-s3" (include "dinoctl.fullname" .)) (include "dinoctl.s3ExistingSecret" .) }}
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
