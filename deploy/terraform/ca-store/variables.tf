# The PostgreSQL database `ca serve --store` replicas share (inventory, join tokens, revocations,
# CRL numbers). Point it at an existing RDS (or Aurora PostgreSQL) instance: this module stores
# the connection string in Secrets Manager for the replicas (GATEHOUSE_CA_STORE) and opens the
# database's security group to them. It does not create the database.

variable "name" {
  description = "Name prefix of the secret and the security group rule (e.g. gatehouse-ca)."
  type        = string
  default     = "gatehouse-ca"
}

variable "rds_endpoint" {
  description = "The RDS endpoint, host:port as aws_db_instance.endpoint gives it (e.g. gatehouse.abc123.eu-west-1.rds.amazonaws.com:5432)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9.-]+:[0-9]+$", var.rds_endpoint))
    error_message = "rds_endpoint must be host:port, e.g. gatehouse.abc123.eu-west-1.rds.amazonaws.com:5432."
  }
}

variable "database" {
  description = "Database name on that instance (the CA's tables are created there by `ca serve` at start: gatehouse_*)."
  type        = string
  default     = "gatehouse"
}

variable "username" {
  description = "Database user `ca serve` connects as (needs CREATE on the database for the first migration, then SELECT/INSERT/UPDATE)."
  type        = string
  default     = "gatehouse_ca"
}

variable "password" {
  description = "That user's password. Stored only in the Secrets Manager secret (and in Terraform state: keep state encrypted)."
  type        = string
  sensitive   = true
}

variable "rds_security_group_id" {
  description = "Security group of the RDS instance; the CA replicas' security group is allowed in on the endpoint's port."
  type        = string
}

variable "ca_security_group_id" {
  description = "Security group of the `ca serve` replicas (ECS tasks or EKS nodes/pods)."
  type        = string
}

variable "kms_key_id" {
  description = "KMS key for the secret (null: the AWS managed key aws/secretsmanager)."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}
