{{/*
One PyTorchJob for a stage; call with (dict "root" $ "stage" "pretrain").
Same rules as app/launch/render.py: container `pytorch`, Master replicas 1 + Worker replicas-1,
string nprocPerNode, cleanPodPolicy Running, S3/MLflow settings by reference, hardened pods.
*/}}
{{- define "dinoctl.pytorchjob" -}}
{{- $root := .root }}
{{- $stage := .stage }}
{{- /* Stage keys override the defaults key by key (also 0 and false, unlike `merge`). */}}
{{- $job := deepCopy $root.Values.jobs.defaults }}
{{- range $k, $v := index $root.Values.jobs $stage }}
{{- $_ := set $job $k $v }}
{{- end }}
{{- $name := printf "%s-%s" (include "dinoctl.fullname" $root) $stage }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "jobs.%s: job name %q is not a DNS-1035 label; set fullnameOverride to start with a letter" $stage $name) }}
{{- end }}
{{- $image := default (include "dinoctl.image" $root) $job.image }}
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {{ $name }}
  labels:
    {{- include "dinoctl.labels" (dict "root" $root "component" $stage) | nindent 4 }}
    dinoctl.dev/stage: {{ $stage }}
    {{- with $job.queue }}
    kueue.x-k8s.io/queue-name: {{ . }}
    {{- end }}
spec:
  nprocPerNode: {{ $job.nprocPerNode | toString | quote }}
  runPolicy:
    cleanPodPolicy: Running
    backoffLimit: {{ int64 $job.backoffLimit }}
    {{- if $job.activeDeadlineSeconds }}
    activeDeadlineSeconds: {{ int64 $job.activeDeadlineSeconds }}
    {{- end }}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: {{ $job.restartPolicy }}
      template:
        {{- include "dinoctl.pytorchjobPod" (dict "root" $root "stage" $stage "job" $job "image" $image) | nindent 8 }}
    {{- if gt (int $job.replicas) 1 }}
    Worker:
      replicas: {{ sub (int $job.replicas) 1 }}
      restartPolicy: {{ $job.restartPolicy }}
      template:
        {{- include "dinoctl.pytorchjobPod" (dict "root" $root "stage" $stage "job" $job "image" $image) | nindent 8 }}
    {{- end }}
{{- end }}

{{- define "dinoctl.pytorchjobPod" -}}
{{- $root := .root }}
{{- $job := .job }}
metadata:
  labels:
    {{- include "dinoctl.labels" (dict "root" $root "component" .stage) | nindent 4 }}
    dinoctl.dev/stage: {{ .stage }}
  annotations:
    sidecar.istio.io/inject: "false"
spec:
  automountServiceAccountToken: false
  securityContext:
    {{- include "dinoctl.podSecurityContext" $root | nindent 4 }}
  {{- with $job.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $job.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $job.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: pytorch
      image: {{ .image | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: {{ concat (list "torchrun" "-m" "app.entry" .stage) $job.args | toJson }}
      env:
        {{- include "dinoctl.s3CredentialsEnv" $root | nindent 8 }}
        {{- include "dinoctl.settingsEnv" $root | nindent 8 }}
        - name: DINOCTL_JOB_NAME
          valueFrom:
            fieldRef: {fieldPath: "metadata.labels['training.kubeflow.org/job-name']"}
        - name: DINOCTL_NAMESPACE
          valueFrom:
            fieldRef: {fieldPath: metadata.namespace}
        - {name: DINOCTL_IMAGE, value: {{ .image | quote }}}
        - {name: HOME, value: /tmp}
        {{- range $job.env }}
        - {name: {{ .name }}, value: {{ .value | quote }}}
        {{- end }}
      ports:
        - {name: pytorchjob-port, containerPort: 23456, protocol: TCP}
      resources:
        requests:
          cpu: {{ $job.cpu | quote }}
          memory: {{ $job.memory | quote }}
          {{- if $job.gpus }}
          nvidia.com/gpu: {{ $job.gpus | toString | quote }}
          {{- end }}
        limits:
          memory: {{ $job.memory | quote }}
          {{- if $job.gpus }}
          nvidia.com/gpu: {{ $job.gpus | toString | quote }}
          {{- end }}
      securityContext:
        {{- include "dinoctl.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        - {name: configs, mountPath: /etc/dinoctl/configs, readOnly: true}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: dshm
      emptyDir: {medium: Memory}
    - name: configs
      configMap:
        name: {{ include "dinoctl.configsName" $root }}
{{- end }}
