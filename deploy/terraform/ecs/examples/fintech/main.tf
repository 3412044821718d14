# The seed's two ECS services behind Gatehouse: the monolith (monolith-service) and the report
# service split out of it. The report service may call the monolith's report data API; the API
# gateway's VPC link subnets may call both (the policies decide which routes).
#
#   cd deploy/terraform/ecs/examples/fintech
#   cp fintech.tfvars.example fintech.tfvars   # fill in your VPC, subnets, images and secrets
#   terraform init && terraform plan -var-file=fintech.tfvars

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.60.0, < 6.0.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region of the platform."
  type        = string
}

variable "cluster_arn" {
  description = "ECS cluster both services run in."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the platform."
  type        = string
}

variable "monolith_subnet_ids" {
  description = "Private subnets of the monolith tier."
  type        = list(string)
}

variable "report_service_subnet_ids" {
  description = "Private subnets of the report service tier."
  type        = list(string)
}

variable "gateway_vpc_link_cidr_blocks" {
  description = "CIDR blocks the API gateway's VPC link connects from."
  type        = list(string)
}

variable "monolith_image" {
  description = "Monolith image, pinned."
  type        = string
}

variable "report_service_image" {
  description = "Report service image, pinned."
  type        = string
}

variable "gatehouse_image" {
  description = "Gatehouse image (deploy/container/Containerfile), pinned."
  type        = string
}

variable "monolith_svid_secret_arn" {
  description = "Secret with the monolith's SVID as JSON {cert_pem, key_pem}."
  type        = string
}

variable "report_service_svid_secret_arn" {
  description = "Secret with the report service's SVID as JSON {cert_pem, key_pem}."
  type        = string
}

variable "trust_bundle_secret_arn" {
  description = "Secret with the CA bundle (plain PEM)."
  type        = string
}

variable "crl_secret_arn" {
  description = "Secret with the CRL (plain PEM), or null."
  type        = string
  default     = null
}

variable "monolith_service_registry_arn" {
  description = "Cloud Map service for monolith.fintech.internal, or null."
  type        = string
  default     = null
}

locals {
  tags = { project = "fintech", managed-by = "terraform", component = "gatehouse" }
}

module "monolith" {
  source = "../.."

  name                              = "monolith"
  cluster_arn                       = var.cluster_arn
  vpc_id                            = var.vpc_id
  subnet_ids                        = var.monolith_subnet_ids
  allowed_source_cidr_blocks        = var.gateway_vpc_link_cidr_blocks
  allowed_source_security_group_ids = [module.report_service.security_group_id]
  app_image                         = var.monolith_image
  sidecar_image                     = var.gatehouse_image
  policy_toml                       = file("${path.module}/../../../../kubernetes/overlays/monolith/policy.toml")
  svid_secret_arn                   = var.monolith_svid_secret_arn
  trust_bundle_secret_arn           = var.trust_bundle_secret_arn
  crl_secret_arn                    = var.crl_secret_arn
  service_registry_arn              = var.monolith_service_registry_arn
  tags                              = local.tags
}

module "report_service" {
  source = "../.."

  name                       = "report-service"
  cluster_arn                = var.cluster_arn
  vpc_id                     = var.vpc_id
  subnet_ids                 = var.report_service_subnet_ids
  allowed_source_cidr_blocks = var.gateway_vpc_link_cidr_blocks
  app_image                  = var.report_service_image
  app_environment = {
    MONOLITH_BASE_URL = "http://127.0.0.1:7001"
    # Spring Boot reads its PostgreSQL through the sidecar's [[tcp_outbound]]: plain TCP on
    # loopback, mTLS to the database host's sidecar (which lets in only the report service).
    SPRING_DATASOURCE_URL = "jdbc:postgresql://127.0.0.1:5432/reports?sslmode=disable"
  }
  sidecar_image = var.gatehouse_image
  # The monolith's Cloud Map name (MULTIVALUE A records, one per task): the sidecar balances
  # every request over all of them (see ../../README.md).
  outbounds = [{
    name      = "monolith"
    listen    = "127.0.0.1:7001"
    connect   = "monolith.fintech.internal:8443"
    server_id = "spiffe://fintech.internal/monolith"
    }, {
    # The reports database runs on its own host with a TCP-only sidecar
    # (deploy/examples/fintech/databases/reports-db/sidecar.toml, under systemd:
    # deploy/systemd): its [[tcp_inbound]] "postgres" listens on 15432.
    name      = "reports-db"
    listen    = "127.0.0.1:5432"
    connect   = "reports-db.fintech.internal:15432"
    server_id = "spiffe://fintech.internal/reports-db"
    tcp       = true
  }]
  policy_toml             = file("${path.module}/../../../../kubernetes/overlays/report-service/policy.toml")
  svid_secret_arn         = var.report_service_svid_secret_arn
  trust_bundle_secret_arn = var.trust_bundle_secret_arn
  crl_secret_arn          = var.crl_secret_arn
  tags                    = local.tags
}

output "monolith_task_definition_arn" {
  description = "Monolith task definition."
  value       = module.monolith.task_definition_arn
}

output "report_service_task_definition_arn" {
  description = "Report service task definition."
  value       = module.report_service.task_definition_arn
}

output "audit_log_groups" {
  description = "Where each service's Gatehouse audit log goes."
  value       = [module.monolith.audit_log_group_name, module.report_service.audit_log_group_name]
}
