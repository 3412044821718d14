# ---------------------------------------------------------------------------------------------
# Identity of the service
# ---------------------------------------------------------------------------------------------

variable "name" {
  description = "Service name, used for the task family, the ECS service, log groups, roles and the security group (for example \"report-service\"). Lowercase letters, digits and dashes."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,38}[a-z0-9]$", var.name))
    error_message = "name must be 2-40 characters of lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource the module creates."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Where it runs
# ---------------------------------------------------------------------------------------------

variable "cluster_arn" {
  description = "ARN of the existing ECS cluster the service runs in."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the service's private subnets."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets the tasks are placed in (the service's own subnet tier). Tasks get no public IP."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids must name at least one subnet."
  }
}

variable "allowed_source_cidr_blocks" {
  description = "CIDR blocks of the service subnets whose workloads may open connections to the sidecar port (for the report service: the API gateway's VPC link subnets; for the monolith: the report service subnets and the gateway's). Nothing else, and no other port, is admitted."
  type        = list(string)
  default     = []
}

variable "allowed_source_security_group_ids" {
  description = "Security groups (for example the report service's) whose members may open connections to the sidecar port. Combined with allowed_source_cidr_blocks."
  type        = list(string)
  default     = []
}

variable "egress_cidr_blocks" {
  description = "Where the tasks may open connections: the peers' sidecar ports, and ECR, Secrets Manager and CloudWatch Logs (or their VPC endpoints). Narrow this to your VPC CIDR when those endpoints exist."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

# ---------------------------------------------------------------------------------------------
# Task size and scaling (the seed's 2 vCPU / 4 GB per task, 2 to 8 tasks)
# ---------------------------------------------------------------------------------------------

variable "cpu" {
  description = "Fargate task CPU units (1024 = 1 vCPU), shared by the app and the sidecar."
  type        = number
  default     = 2048
}

variable "memory" {
  description = "Fargate task memory in MiB, shared by the app and the sidecar."
  type        = number
  default     = 4096
}

variable "cpu_architecture" {
  description = "X86_64 or ARM64; the images must be built for it."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

variable "desired_count" {
  description = "Number of tasks to run. Autoscaling (2 to 8 tasks in the seed) is attached outside this module; the service ignores later changes of desired_count."
  type        = number
  default     = 2
}

# ---------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------

variable "app_image" {
  description = "Image of the application (the Spring Boot service), pinned by tag or digest."
  type        = string
}

variable "app_port" {
  description = "Port the application listens on, on 127.0.0.1 only. Not published, not in the security group: only the sidecar reaches it."
  type        = number
  default     = 8080
}

variable "app_environment" {
  description = "Extra environment variables for the application container (non-secret)."
  type        = map(string)
  default     = {}
}

variable "app_readonly_root_filesystem" {
  description = "Run the app container with a read-only root file system; it gets a writable task volume at /tmp (Spring Boot's embedded Tomcat writes there). Set false only for an image that writes elsewhere."
  type        = bool
  default     = true
}

variable "app_health_check_command" {
  description = "Health check command run inside the app container (ECS healthCheck.command), or null for none. The app is essential either way."
  type        = list(string)
  default     = null
}

variable "sidecar_image" {
  description = "Gatehouse image (deploy/container/Containerfile) with /usr/local/bin/sidecar, pinned by tag or digest."
  type        = string
}

variable "init_image" {
  description = "Small image with /bin/sh and printf that writes the certificates and config from its environment to the task's shared volume before the sidecar starts (see README). It is the only container that sees the secrets as environment variables."
  type        = string
  default     = "public.ecr.aws/docker/library/busybox:1.36"
}

variable "sidecar_port" {
  description = "Port of the sidecar's inbound mTLS listener: the only port callers can reach."
  type        = number
  default     = 8443
}

variable "admin_port" {
  description = "Port of the sidecar's admin listener (/metrics /healthz /readyz /status), bound to 127.0.0.1 inside the task unless metrics_scraper_security_group_ids is set."
  type        = number
  default     = 9901
}

variable "metrics_scraper_security_group_ids" {
  description = "Security groups of a Prometheus (or collector) allowed to scrape the sidecar's /metrics. Empty (default): the admin listener stays on 127.0.0.1 inside the task and nothing outside it can reach it. Non-empty: it binds 0.0.0.0:<admin_port> and only these groups are admitted to that port (it serves /metrics /healthz /readyz /status, plaintext, no secrets)."
  type        = list(string)
  default     = []
}

variable "sidecar_health_check_command" {
  description = "Health check command run inside the sidecar container, or null for the default: the image's gatehouse-probe GETs http://127.0.0.1:<admin_port>/readyz and succeeds only on 200. [\"CMD\", \"/usr/local/bin/sidecar\", \"check\", \"--config\", \"/run/gatehouse/sidecar.toml\"] is an alternative that re-validates config, policy and certificates (an expired certificate then makes the task unhealthy and ECS replaces it with one that reads the current secret)."
  type        = list(string)
  default     = null
}

variable "outbounds" {
  description = "Outbound listeners of the sidecar: the app calls http://127.0.0.1:<listen port>, the sidecar connects over mTLS to `connect` and accepts only a server presenting `server_id`. For the report service: [{ name = \"monolith\", listen = \"127.0.0.1:7001\", connect = \"monolith.fintech.internal:8443\", server_id = \"spiffe://fintech.internal/monolith\" }]. Point `connect` at the peer's Cloud Map name (MULTIVALUE A records, one per task): the sidecar balances every request over all of them; optional `resolver` names another DNS server. With tcp = true the listener is plain TCP (a [[tcp_outbound]], issue 17), e.g. for a database: the app's JDBC URL jdbc:postgresql://127.0.0.1:5432/reports?sslmode=disable reaches `connect`, the database host's [[tcp_inbound]]; egress_cidr_blocks must admit that host."
  type = list(object({
    name      = string
    listen    = string
    connect   = string
    server_id = string
    tcp       = optional(bool, false)
    # The DNS server that resolves `connect` ("IP:PORT"); null = the task's resolver (the VPC
    # resolver, which answers for Cloud Map private namespaces).
    resolver = optional(string)
  }))
  default = []

  validation {
    condition     = alltrue([for o in var.outbounds : startswith(o.listen, "127.0.0.1:")])
    error_message = "outbound listeners must listen on 127.0.0.1: only the task's own app may use them."
  }

  validation {
    condition     = alltrue([for o in var.outbounds : startswith(o.server_id, "spiffe://")])
    error_message = "server_id must be a SPIFFE ID (spiffe://trust-domain/path)."
  }
}

variable "policy_toml" {
  description = "Contents of the sidecar's policy file (docs/POLICY.md). Changing it creates a new task definition revision and rolls the service."
  type        = string

  validation {
    condition     = length(trimspace(var.policy_toml)) > 0
    error_message = "policy_toml must not be empty: without routes every request is denied."
  }
}

variable "min_tls" {
  description = "Lowest TLS version the sidecar accepts: \"1.3\" (default) or \"1.2\"."
  type        = string
  default     = "1.3"

  validation {
    condition     = contains(["1.2", "1.3"], var.min_tls)
    error_message = "min_tls must be \"1.2\" or \"1.3\"."
  }
}

# ---------------------------------------------------------------------------------------------
# Certificates (Secrets Manager)
# ---------------------------------------------------------------------------------------------

variable "svid_secret_arn" {
  description = "ARN of this service's Secrets Manager secret: a JSON object with keys cert_pem (leaf + chain, from `ca issue`) and key_pem (PKCS#8 private key). Only this service's execution role can read it."
  type        = string
}

variable "trust_bundle_secret_arn" {
  description = "ARN of the secret holding the CA bundle (bundle.pem) as plain text. During a root rotation it holds the old and the new root."
  type        = string
}

variable "crl_secret_arn" {
  description = "ARN of the secret holding the CRL (`ca crl` output) as plain text, or null to run without revocation checking."
  type        = string
  default     = null
}

variable "online_identity" {
  description = "Online identity (issue 16), or null for file-based SVIDs. When set, svid_secret_arn holds an enrollment certificate from `ca enrollment issue` (same keys cert_pem/key_pem): each task makes its own key in memory, enrolls with ca_url (https://host:port of `ca serve`) as spiffe_id, and renews its short-lived SVID in place, with no redeploy; crl_secret_arn is then unused (the CRLs come from the CA). egress_cidr_blocks must admit the CA's address."
  type = object({
    ca_url    = string
    spiffe_id = string
  })
  default = null
  validation {
    condition     = var.online_identity == null || startswith(try(var.online_identity.ca_url, ""), "https://")
    error_message = "online_identity.ca_url must be the https:// URL of ca serve, e.g. https://ca.fintech.internal:8444."
  }
}

variable "secrets_kms_key_arn" {
  description = "Customer managed KMS key the secrets are encrypted with, or null when they use the AWS managed key (aws/secretsmanager)."
  type        = string
  default     = null
}

variable "ecr_repository_arns" {
  description = "ECR repositories the execution role may pull from (the app and Gatehouse images). Empty when all images are public."
  type        = list(string)
  default     = []
}

# ---------------------------------------------------------------------------------------------
# Logs, roles, traffic
# ---------------------------------------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of the CloudWatch log groups. The audit log is evidence for SOC 2 / PCI DSS reviews: keep it at least a year (PCI DSS 10.5.1)."
  type        = number
  default     = 400
}

variable "logs_kms_key_arn" {
  description = "KMS key to encrypt the log groups with, or null for CloudWatch's default encryption."
  type        = string
  default     = null
}

variable "task_role_arn" {
  description = "IAM role the application assumes (its own AWS permissions), or null for none. The sidecar needs no AWS permissions at runtime."
  type        = string
  default     = null
}

variable "load_balancer_target_group_arn" {
  description = "Target group (NLB, TCP passthrough to the sidecar port) to register the tasks in, or null. TLS must not be terminated in front of the sidecar: the caller's certificate is the identity."
  type        = string
  default     = null
}

variable "service_registry_arn" {
  description = "Cloud Map service ARN to register the tasks under (how peers find this service, for example monolith.fintech.internal), or null. Create it with dns_config { routing_policy = \"MULTIVALUE\", dns_records { type = \"A\", ttl = 10 } } so the name returns every healthy task (up to 8) and callers' sidecars balance requests over all of them."
  type        = string
  default     = null
}
