{{/*
Names, labels and the effective settings of every component.

A Dragonfly values file can be used as is: the blocks `seedPeer` and `dfdaemon` are translated onto
`seedFetcher` and `node` here, once, and every template reads the result (README.md lists the mapping).
Numbers in .Values are float64 (Helm reads values through JSON), so ports go through `int` and whole
config blocks through toYaml, never through plain printing.
*/}}

{{/* The chart's name. */}}
{{- define "damselfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name for resources. */}}
{{- define "damselfly.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's resource name; 52 characters leave room for StatefulSet pod and revision suffixes. */}}
{{- define "damselfly.componentName" -}}
{{- printf "%s-%s" (include "damselfly.fullname" .ctx) .component | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* The chart label. */}}
{{- define "damselfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select a component's pods: call with (dict "ctx" $ "component" "scheduler"). */}}
{{- define "damselfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "damselfly.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of a component's objects: the recommended app.kubernetes.io set. */}}
{{- define "damselfly.labels" -}}
helm.sh/chart: {{ include "damselfly.chart" .ctx }}
{{ include "damselfly.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: damselfly
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The Damselfly image (one image runs every service; its entrypoint is `python -m`). */}}
{{- define "damselfly.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}

{{/*
Where every service keeps its state inside its container: the image's DAMSELFLY_WORKDIR, on a volume.
*/}}
{{- define "damselfly.workdir" -}}
/var/lib/damselfly
{{- end }}

{{/* The NATS URL every service connects to. */}}
{{- define "damselfly.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s.%s.svc:%d" (include "damselfly.componentName" (dict "ctx" . "component" "nats")) .Release.Namespace (int .Values.nats.port) -}}
{{- else if .Values.externalNats.url -}}
{{- .Values.externalNats.url -}}
{{- else -}}
{{- fail "nats.enabled is false but externalNats.url is empty: set externalNats.url (e.g. nats://nats.example:4222) or nats.enabled=true" -}}
{{- end -}}
{{- end }}

{{/* "true" when the scheduler uses an external database (PostgreSQL), else "" (SQLite on a volume). */}}
{{- define "damselfly.externalDatabase" -}}
{{- if or .Values.externalDatabase.url .Values.externalDatabase.existingSecret -}}true{{- end -}}
{{- end }}

{{/* The Secret holding the external database URL. */}}
{{- define "damselfly.databaseSecretName" -}}
{{- default (include "damselfly.componentName" (dict "ctx" . "component" "database")) .Values.externalDatabase.existingSecret -}}
{{- end }}

{{/*
Overlay: set every key of .src into .dst, merging one level of nested maps (telemetry, nats,
registry_mirror). Written with `set` because sprig's merge functions skip false and 0.
*/}}
{{- define "damselfly.overlay" -}}
{{- $dst := .dst -}}
{{- range $key, $value := .src -}}
{{- $current := get $dst $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $current) -}}
{{- range $innerKey, $innerValue := $value -}}
{{- if or (kindIs "map" $innerValue) (kindIs "slice" $innerValue) -}}
{{- $_ := set $current $innerKey (deepCopy $innerValue) -}}
{{- else -}}
{{- $_ := set $current $innerKey $innerValue -}}
{{- end -}}
{{- end -}}
{{- else if or (kindIs "map" $value) (kindIs "slice" $value) -}}
{{- $_ := set $dst $key (deepCopy $value) -}}
{{- else -}}
{{- $_ := set $dst $key $value -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* A metrics block with every key present. */}}
{{- define "damselfly.metricsBlock" -}}
{{- $metrics := deepCopy (default dict .) -}}
{{- if not (hasKey $metrics "enable") }}{{ $_ := set $metrics "enable" true }}{{ end -}}
{{- $monitor := deepCopy (default dict $metrics.serviceMonitor) -}}
{{- if not (hasKey $monitor "enable") }}{{ $_ := set $monitor "enable" false }}{{ end -}}
{{- $_ := set $metrics "serviceMonitor" $monitor -}}
{{- toYaml $metrics -}}
{{- end }}

{{/*
Dragonfly's component keys that Damselfly honours: enable, replicas, hostNetwork, nodeSelector,
tolerations, affinity, metrics.enable, metrics.serviceMonitor.enable (and persistence for seedPeer).
Call with (dict "dst" $native "src" $dragonflyBlock).
*/}}
{{- define "damselfly.translateComponent" -}}
{{- $dst := .dst -}}
{{- $src := default dict .src -}}
{{- range $key := list "enable" "replicas" "hostNetwork" "nodeSelector" "tolerations" "affinity" -}}
{{- if hasKey $src $key }}{{ $_ := set $dst $key (get $src $key) }}{{ end -}}
{{- end -}}
{{- $metrics := include "damselfly.metricsBlock" $dst.metrics | fromYaml -}}
{{- with $src.metrics -}}
{{- if hasKey . "enable" }}{{ $_ := set $metrics "enable" .enable }}{{ end -}}
{{- if and .serviceMonitor (hasKey .serviceMonitor "enable") }}{{ $_ := set $metrics.serviceMonitor "enable" .serviceMonitor.enable }}{{ end -}}
{{- end -}}
{{- $_ := set $dst "metrics" $metrics -}}
{{- if and $src.persistence $dst.persistence -}}
{{- $persistence := $dst.persistence -}}
{{- with $src.persistence -}}
{{- if hasKey . "enable" }}{{ $_ := set $persistence "enabled" .enable }}{{ end -}}
{{- if hasKey . "size" }}{{ $_ := set $persistence "size" .size }}{{ end -}}
{{- if hasKey . "storageClass" }}{{ $_ := set $persistence "storageClass" .storageClass }}{{ end -}}
{{- if hasKey . "accessModes" }}{{ $_ := set $persistence "accessModes" .accessModes }}{{ end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The scheduler's settings (the `scheduler` block is the same in both charts). */}}
{{- define "damselfly.schedulerValues" -}}
{{- $scheduler := deepCopy .Values.scheduler -}}
{{- $_ := set $scheduler "metrics" (include "damselfly.metricsBlock" $scheduler.metrics | fromYaml) -}}
{{- toYaml $scheduler -}}
{{- end }}

{{/* The seed node's settings: `seedFetcher`, with Dragonfly's `seedPeer` on top. */}}
{{- define "damselfly.seedValues" -}}
{{- $seed := deepCopy .Values.seedFetcher -}}
{{- $_ := include "damselfly.translateComponent" (dict "dst" $seed "src" .Values.seedPeer) -}}
{{- toYaml $seed -}}
{{- end }}

{{/* The node agent's settings: `node`, with Dragonfly's `dfdaemon` on top (tcpListen sets the proxy's address). */}}
{{- define "damselfly.nodeValues" -}}
{{- $node := deepCopy .Values.node -}}
{{- $dfdaemon := default dict .Values.dfdaemon -}}
{{- $_ := include "damselfly.translateComponent" (dict "dst" $node "src" $dfdaemon) -}}
{{- $listen := dig "config" "proxy" "tcpListen" dict $dfdaemon -}}
{{- if hasKey $listen "port" }}{{ $_ := set $node.proxy "port" $listen.port }}{{ end -}}
{{- if hasKey $listen "listen" }}{{ $_ := set $node.proxy "listen" $listen.listen }}{{ end -}}
{{- toYaml $node -}}
{{- end }}

{{/* The log level of a component: DEBUG when Dragonfly's `config.verbose` is true. */}}
{{- define "damselfly.logLevel" -}}
{{- if dig "verbose" false (default dict .) }}DEBUG{{ else }}INFO{{ end -}}
{{- end }}

{{/* The registry-proxy's config file (Dragonfly's dfdaemon `proxy` block, translated). */}}
{{- define "damselfly.config.registryProxy" -}}
{{- $node := include "damselfly.nodeValues" . | fromYaml -}}
{{- $dfConfig := dig "config" dict (default dict .Values.dfdaemon) -}}
{{- $proxy := dig "proxy" dict $dfConfig -}}
{{- $config := dict
  "host" $node.proxy.listen
  "port" (int $node.proxy.port)
  "workdir" (include "damselfly.workdir" .)
  "storage_dir" (printf "%s/pieces" (include "damselfly.workdir" .))
  "database_url" (printf "sqlite:///%s/pieces/store.db" (include "damselfly.workdir" .))
  "cache_store_url" (printf "http://127.0.0.1:%d" (int $node.cacheStore.port))
  "nats" (dict "url" (include "damselfly.natsUrl" .))
  "telemetry" (dict "log_level" (include "damselfly.logLevel" $dfConfig))
  "registry_mirror" (dict "url" "https://index.docker.io" "dynamic" true)
  "proxies" (list (dict "regx" "blobs/sha256.*"))
  "default_filter" "Expires&Signature&ns"
  "prefetch" true
-}}
{{- with $proxy.registryMirror }}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" (dict "registry_mirror" .)) -}}
{{- end -}}
{{- if hasKey $proxy "proxies" }}{{ $_ := set $config "proxies" (deepCopy $proxy.proxies) }}{{ end -}}
{{- if hasKey $proxy "defaultFilter" }}{{ $_ := set $config "default_filter" $proxy.defaultFilter }}{{ end -}}
{{- $download := dig "download" dict $dfConfig -}}
{{- if hasKey $download "prefetch" }}{{ $_ := set $config "prefetch" $download.prefetch }}{{ end -}}
{{- $security := dig "security" dict $proxy -}}
{{- if and (hasKey $security "insecure") (not $security.insecure) -}}
{{- fail "dfdaemon.config.proxy.security.insecure is false, which asks for a TLS proxy listener: Damselfly's registry-proxy serves plain HTTP on the node (as Dragonfly does with insecure: true); remove the key or set it to true" -}}
{{- end -}}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" .Values.node.proxy.config) -}}
{{- toYaml $config -}}
{{- end }}

{{/* The node cache-store's config file (the pod-specific name and address come from the environment). */}}
{{- define "damselfly.config.nodeCacheStore" -}}
{{- $node := include "damselfly.nodeValues" . | fromYaml -}}
{{- $dfConfig := dig "config" dict (default dict .Values.dfdaemon) -}}
{{- $config := dict
  "host" "0.0.0.0"
  "port" (int $node.cacheStore.port)
  "workdir" (include "damselfly.workdir" .)
  "storage_dir" (printf "%s/pieces" (include "damselfly.workdir" .))
  "database_url" (printf "sqlite:///%s/pieces/store.db" (include "damselfly.workdir" .))
  "is_seed" false
  "nats" (dict "url" (include "damselfly.natsUrl" .))
  "telemetry" (dict "log_level" (include "damselfly.logLevel" $dfConfig))
-}}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" .Values.node.cacheStore.config) -}}
{{- toYaml $config -}}
{{- end }}

{{/* The address the chunk-fuse agent binds: loopback on the host network unless configured, else the pod's. */}}
{{- define "damselfly.chunkFuseHost" -}}
{{- $node := include "damselfly.nodeValues" . | fromYaml -}}
{{- if $node.hostNetwork }}{{ $node.chunkFuse.listen }}{{ else }}0.0.0.0{{ end -}}
{{- end }}

{{/* The chunk-fuse agent's config file. */}}
{{- define "damselfly.config.chunkFuse" -}}
{{- $node := include "damselfly.nodeValues" . | fromYaml -}}
{{- $dfConfig := dig "config" dict (default dict .Values.dfdaemon) -}}
{{- $config := dict
  "host" (include "damselfly.chunkFuseHost" .)
  "port" (int $node.chunkFuse.port)
  "workdir" (include "damselfly.workdir" .)
  "mirror_url" (printf "http://127.0.0.1:%d" (int $node.proxy.port))
  "fuse_device" "/dev/fuse"
  "run_dir" .Values.node.runDir
  "nats" (dict "url" (include "damselfly.natsUrl" .))
  "telemetry" (dict "log_level" (include "damselfly.logLevel" $dfConfig))
-}}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" .Values.node.chunkFuse.config) -}}
{{- toYaml $config -}}
{{- end }}

{{/*
The seed-fetcher's config file. The seed may fetch from the nodes' mirror and every registry the
nodes allow (what `damselfly up` gives it), and skips TLS checks when the mirror does.
*/}}
{{- define "damselfly.config.seedFetcher" -}}
{{- $seed := include "damselfly.seedValues" . | fromYaml -}}
{{- $proxyConfig := include "damselfly.config.registryProxy" . | fromYaml -}}
{{- $dfConfig := dig "config" dict (default dict .Values.seedPeer) -}}
{{- $allowed := prepend (default list $proxyConfig.allowed_registries) $proxyConfig.registry_mirror.url | uniq -}}
{{- $config := dict
  "host" "0.0.0.0"
  "port" (int $seed.port)
  "workdir" (include "damselfly.workdir" .)
  "storage_dir" (printf "%s/pieces" (include "damselfly.workdir" .))
  "database_url" (printf "sqlite:///%s/pieces/store.db" (include "damselfly.workdir" .))
  "allowed_registries" $allowed
  "insecure" (dig "insecure" false $proxyConfig.registry_mirror)
  "nats" (dict "url" (include "damselfly.natsUrl" .))
  "telemetry" (dict "log_level" (include "damselfly.logLevel" $dfConfig))
-}}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" .Values.seedFetcher.config) -}}
{{- toYaml $config -}}
{{- end }}

{{/* The seed node's cache-store: a seed (`is_seed`), sharing the fetcher's piece store. */}}
{{- define "damselfly.config.seedCacheStore" -}}
{{- $seed := include "damselfly.seedValues" . | fromYaml -}}
{{- $dfConfig := dig "config" dict (default dict .Values.seedPeer) -}}
{{- $config := dict
  "host" "0.0.0.0"
  "port" (int $seed.cacheStore.port)
  "workdir" (include "damselfly.workdir" .)
  "storage_dir" (printf "%s/pieces" (include "damselfly.workdir" .))
  "database_url" (printf "sqlite:///%s/pieces/store.db" (include "damselfly.workdir" .))
  "is_seed" true
  "nats" (dict "url" (include "damselfly.natsUrl" .))
  "telemetry" (dict "log_level" (include "damselfly.logLevel" $dfConfig))
-}}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" .Values.seedFetcher.cacheStore.config) -}}
{{- toYaml $config -}}
{{- end }}

{{/* The scheduler's config file; Dragonfly's debug-only keys are left out, `verbose` sets the log level. */}}
{{- define "damselfly.config.scheduler" -}}
{{- $native := omit (default dict .Values.scheduler.config) "verbose" "pprofPort" -}}
{{- $config := dict
  "host" "0.0.0.0"
  "port" (int .Values.scheduler.port)
  "workdir" (include "damselfly.workdir" .)
  "nats" (dict "url" (include "damselfly.natsUrl" .))
  "telemetry" (dict "log_level" (include "damselfly.logLevel" .Values.scheduler.config))
-}}
{{- $_ := include "damselfly.overlay" (dict "dst" $config "src" $native) -}}
{{- toYaml $config -}}
{{- end }}

{{/*
Liveness on /healthz, readiness on /readyz, and a startup probe that gives NATS and the database time.
Call with (dict "port" "http") and optionally "host" (a host-network pod bound to loopback).
*/}}
{{- define "damselfly.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
    {{- with .host }}
    host: {{ . }}
    {{- end }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
    {{- with .host }}
    host: {{ . }}
    {{- end }}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 6
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
    {{- with .host }}
    host: {{ . }}
    {{- end }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/*
Environment every Damselfly container gets: its node name from the pod, and the bind address and workdir
of its config file again, because the image sets DAMSELFLY_HOST and DAMSELFLY_WORKDIR and the
environment wins over the file. Call with (dict "nodeNameField" "spec.nodeName" "host" "0.0.0.0" "ctx" $).
*/}}
{{- define "damselfly.baseEnv" -}}
- name: PYTHONUNBUFFERED
  value: "1"
- name: DAMSELFLY_HOST
  value: {{ .host | quote }}
- name: DAMSELFLY_WORKDIR
  value: {{ include "damselfly.workdir" .ctx | quote }}
- name: DAMSELFLY_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: {{ .nodeNameField }}
{{- end }}

{{/* Whether a component gets a ServiceMonitor: its metrics are on and a switch (global or its own) is on. */}}
{{- define "damselfly.serviceMonitorEnabled" -}}
{{- if and .metrics.enable (or .global .metrics.serviceMonitor.enable) }}true{{ end -}}
{{- end }}
