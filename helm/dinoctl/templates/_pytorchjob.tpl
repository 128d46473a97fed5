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
    {{- with $job.workloadPriorityClass }}
    kueue.x-k8s.io/priority-class: {{ . }}
    {{- end }}
spec:
  nprocPerNode: {{ $job.nprocPerNode | toString | quote }}
  runPolicy:
    cleanPodPolicy: Running
    backoffLimit: {{ int64 $job.backoffLimit }}
    {{- if $job.activeDeadlineSeconds }}
    activeDeadlineSeconds: {{ int64 $job.activeDeadlineSeconds }}
    {{- end }}
    {{- if $job.ttlSecondsAfterFinished }}
    ttlSecondsAfterFinished: {{ int64 $job.ttlSecondsAfterFinished }}
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
    {{- with $job.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    sidecar.istio.io/inject: "false"
    {{- with $job.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ int64 $job.terminationGracePeriodSeconds }}
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
        - {name: DINOCTL_SIGTERM_GRACE_S, value: {{ max 10 (sub (int $job.terminationGracePeriodSeconds) 30) | toString | quote }}}
        {{- range $job.env }}
        - {name: {{ .name }}, value: {{ .value | quote }}}
        {{- end }}
      ports:
        - {name: pytorchjob-port, containerPort: 23456, protocol: TCP}
      resources:
        requests:
          cpu: {{ $job.cpu | quote }}
          memory: {{ $job.memory | quote }}
          ephemeral-storage: {{ $job.tmpSize | quote }}
          {{- if $job.gpus }}
          nvidia.com/gpu: {{ $job.gpus | toString | quote }}
          {{- end }}
          {{- range $k, $v := $job.extraResources }}
          {{ $k }}: {{ $v | toString | quote }}
          {{- end }}
        limits:
          memory: {{ $job.memory | quote }}
          {{- if $job.gpus }}
          nvidia.com/gpu: {{ $job.gpus | toString | quote }}
          {{- end }}
          {{- range $k, $v := $job.extraResources }}
          {{ $k }}: {{ $v | toString | quote }}
          {{- end }}
      securityContext:
        {{- include "dinoctl.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        - {name: configs, mountPath: /etc/dinoctl/configs, readOnly: true}
        {{- with $job.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: {{ $job.tmpSize | quote }}}
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $job.shmSize | quote }}}
    - name: configs
      configMap:
        name: {{ include "dinoctl.configsName" $root }}
    {{- with $job.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
