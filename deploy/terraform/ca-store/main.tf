locals {
  port = tonumber(split(":", var.rds_endpoint)[1])
  # sslmode=require: `ca` verifies the server with rustls against PGSSLROOTCERT (RDS global bundle).
  url = format(
    "postgres://%s:%s@%s/%s?sslmode=require",
    urlencode(var.username),
    urlencode(var.password),
    var.rds_endpoint,
    var.database,
  )
}

resource "aws_secretsmanager_secret" "store" {
  name_prefix = "${var.name}-store-"
  description = "GATEHOUSE_CA_STORE for ca serve --store (PostgreSQL connection string)"
  kms_key_id  = var.kms_key_id
  tags        = var.tags
}

resource "aws_secretsmanager_secret_version" "store" {
  secret_id     = aws_secretsmanager_secret.store.id
  secret_string = local.url
}

resource "aws_vpc_security_group_ingress_rule" "ca_to_rds" {
  security_group_id            = var.rds_security_group_id
  referenced_security_group_id = var.ca_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  description                  = "${var.name}: ca serve replicas to PostgreSQL"
  tags                         = var.tags
}
