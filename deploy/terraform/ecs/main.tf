# One ECS Fargate service whose only reachable port is its Gatehouse sidecar.
#
# Task layout (awsvpc: the three containers share one network namespace):
#   gatehouse-init     non-essential; reads the SVID, CA bundle and CRL from Secrets Manager
#                      (injected as its environment), writes them with the rendered sidecar
#                      config and policy to the shared volume /run/gatehouse, exits 0.
#   gatehouse-sidecar  starts when gatehouse-init succeeded; mounts /run/gatehouse read-only;
#                      inbound mTLS on 0.0.0.0:sidecar_port, admin on 127.0.0.1:admin_port (0.0.0.0, admitted to metrics_scraper_security_group_ids only, when set);
#                      stdout (one JSON audit line per decision) goes to CloudWatch Logs.
#   app                starts when the sidecar is HEALTHY; listens on 127.0.0.1:app_port only.

data "aws_region" "current" {}

locals {
  # Online identity: the CRLs come from the CA, not from a secret.
  with_crl = var.crl_secret_arn != null && var.online_identity == null

  secret_arns = compact([var.svid_secret_arn, var.trust_bundle_secret_arn, var.crl_secret_arn])

  sidecar_toml = templatefile("${path.module}/templates/sidecar.toml.tftpl", {
    min_tls      = var.min_tls
    with_crl     = local.with_crl
    sidecar_port = var.sidecar_port
    app_port     = var.app_port
    admin_port   = var.admin_port
    admin_host   = local.metrics_enabled ? "0.0.0.0" : "127.0.0.1"
    outbounds    = var.outbounds
    online       = var.online_identity
  })

  # A Prometheus in the VPC may scrape /metrics: the admin listener then binds the task's
  # interface and the security group admits the admin port from the scraper's groups only.
  metrics_enabled = length(var.metrics_scraper_security_group_ids) > 0

  # gatehouse-probe (deploy/container/probe.rs) GETs the admin port's /readyz from inside the
  # sidecar container: the distroless image has no shell or curl.
  sidecar_health_check_command = coalesce(var.sidecar_health_check_command, [
    "CMD", "/usr/local/bin/gatehouse-probe", "http://127.0.0.1:${var.admin_port}/readyz",
  ])

  # Docker's default capability set minus CHOWN: the init container runs as root only to hand
  # the files it writes to the sidecar's user. (Fargate can drop any capability.)
  init_dropped_capabilities = [
    "AUDIT_WRITE", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
  ]

  # One CloudWatch event per line (no datetime-format grouping: audit lines are JSON objects).
  log_options = { "awslogs-region" = data.aws_region.current.name }
  # The audit log is evidence: the sidecar blocks rather than drop a line when CloudWatch Logs
  # is slow. The app's and the init container's output may be dropped under pressure instead.
  audit_log_mode = { "mode" = "blocking" }
  app_log_mode   = { "mode" = "non-blocking", "max-buffer-size" = "4m" }

  init_container = {
    name                   = "gatehouse-init"
    image                  = var.init_image
    essential              = false
    user                   = "0"
    readonlyRootFilesystem = true
    entryPoint             = ["/bin/sh", "-c"]
    command                = [file("${path.module}/templates/init.sh")]
    environment = [
      { name = "GATEHOUSE_SIDECAR_TOML", value = local.sidecar_toml },
      { name = "GATEHOUSE_POLICY_TOML", value = var.policy_toml },
      # "1": the secret holds an enrollment certificate (online identity), written as
      # enroll-cert.pem / enroll-key.pem; the SVID's key is then made in the sidecar's memory.
      { name = "GATEHOUSE_ONLINE", value = var.online_identity == null ? "0" : "1" },
    ]
    secrets = concat(
      [
        { name = "GATEHOUSE_CERT_PEM", valueFrom = "${var.svid_secret_arn}:cert_pem::" },
        { name = "GATEHOUSE_KEY_PEM", valueFrom = "${var.svid_secret_arn}:key_pem::" },
        { name = "GATEHOUSE_BUNDLE_PEM", valueFrom = var.trust_bundle_secret_arn },
      ],
      local.with_crl ? [{ name = "GATEHOUSE_CRL_PEM", valueFrom = var.crl_secret_arn }] : [],
    )
    mountPoints = [
      { sourceVolume = "gatehouse", containerPath = "/run/gatehouse", readOnly = false },
      { sourceVolume = "app-tmp", containerPath = "/run/app-tmp", readOnly = false },
    ]
    linuxParameters  = { capabilities = { drop = local.init_dropped_capabilities } }
    logConfiguration = { logDriver = "awslogs", options = merge(local.log_options, local.app_log_mode, { "awslogs-group" = aws_cloudwatch_log_group.sidecar.name, "awslogs-stream-prefix" = "init" }) }
  }

  sidecar_container = {
    name                   = "gatehouse-sidecar"
    image                  = var.sidecar_image
    essential              = true
    user                   = "65532:65532"
    readonlyRootFilesystem = true
    entryPoint             = ["/usr/local/bin/sidecar"]
    command                = ["run", "--config", "/run/gatehouse/sidecar.toml"]
    portMappings = concat(
      [{ name = "mtls", containerPort = var.sidecar_port, protocol = "tcp" }],
      local.metrics_enabled ? [{ name = "admin", containerPort = var.admin_port, protocol = "tcp" }] : [],
    )
    dependsOn = [{ containerName = "gatehouse-init", condition = "SUCCESS" }]
    healthCheck = {
      command     = local.sidecar_health_check_command
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 10
    }
    mountPoints     = [{ sourceVolume = "gatehouse", containerPath = "/run/gatehouse", readOnly = true }]
    linuxParameters = { capabilities = { drop = ["ALL"] }, initProcessEnabled = true }
    # SIGTERM: stop accepting, drain in-flight requests; keep this above the sidecar's drain timeout.
    stopTimeout      = 30
    logConfiguration = { logDriver = "awslogs", options = merge(local.log_options, local.audit_log_mode, { "awslogs-group" = aws_cloudwatch_log_group.sidecar.name, "awslogs-stream-prefix" = "sidecar" }) }
  }

  app_container = merge(
    {
      name                   = "app"
      image                  = var.app_image
      essential              = true
      readonlyRootFilesystem = var.app_readonly_root_filesystem
      mountPoints            = [{ sourceVolume = "app-tmp", containerPath = "/tmp", readOnly = false }]
      # No portMappings: the app port is reachable only on 127.0.0.1 inside the task.
      dependsOn = [{ containerName = "gatehouse-sidecar", condition = "HEALTHY" }]
      environment = [for k, v in merge({
        SERVER_ADDRESS = "127.0.0.1"
        SERVER_PORT    = tostring(var.app_port)
      }, var.app_environment) : { name = k, value = v }]
      linuxParameters  = { capabilities = { drop = ["ALL"] }, initProcessEnabled = true }
      logConfiguration = { logDriver = "awslogs", options = merge(local.log_options, local.app_log_mode, { "awslogs-group" = aws_cloudwatch_log_group.app.name, "awslogs-stream-prefix" = "app" }) }
    },
    var.app_health_check_command == null ? {} : {
      healthCheck = { command = var.app_health_check_command, interval = 15, timeout = 5, retries = 3, startPeriod = 60 }
    },
  )
}

# ---------------------------------------------------------------------------------------------
# Logs: the sidecar's stdout is the audit log (one JSON line per decision)
# ---------------------------------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "sidecar" {
  name              = "/ecs/${var.name}/gatehouse"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.logs_kms_key_arn
  tags              = var.tags
}

resource "aws_cloudwatch_log_group" "app" {
  name              = "/ecs/${var.name}/app"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.logs_kms_key_arn
  tags              = var.tags
}

# Denied requests as a CloudWatch metric (alarm on it: a spike is a misconfigured caller or a probe).
resource "aws_cloudwatch_log_metric_filter" "denied" {
  name           = "${var.name}-gatehouse-denied"
  log_group_name = aws_cloudwatch_log_group.sidecar.name
  pattern        = "{ $.decision = \"deny\" }"

  metric_transformation {
    name          = "DeniedRequests"
    namespace     = "Gatehouse/${var.name}"
    value         = "1"
    default_value = "0"
  }
}

# ---------------------------------------------------------------------------------------------
# IAM: the execution role may read exactly this service's secrets and write its own log groups
# ---------------------------------------------------------------------------------------------

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "execution" {
  name_prefix        = substr("${var.name}-exec-", 0, 38)
  description        = "ECS execution role of ${var.name}: pull images, read its Gatehouse secrets, write its logs"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = var.tags
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "ReadGatehouseSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = local.secret_arns
  }

  dynamic "statement" {
    for_each = var.secrets_kms_key_arn == null ? [] : [var.secrets_kms_key_arn]
    content {
      sid       = "DecryptGatehouseSecrets"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${data.aws_region.current.name}.amazonaws.com"]
      }
    }
  }

  statement {
    sid     = "WriteOwnLogs"
    actions = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [
      "${aws_cloudwatch_log_group.sidecar.arn}:log-stream:*",
      "${aws_cloudwatch_log_group.app.arn}:log-stream:*",
    ]
  }

  dynamic "statement" {
    for_each = length(var.ecr_repository_arns) == 0 ? [] : [1]
    content {
      sid       = "EcrAuth"
      actions   = ["ecr:GetAuthorizationToken"]
      resources = ["*"] # this action has no resource-level permissions
    }
  }

  dynamic "statement" {
    for_each = length(var.ecr_repository_arns) == 0 ? [] : [1]
    content {
      sid       = "PullImages"
      actions   = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
      resources = var.ecr_repository_arns
    }
  }
}

resource "aws_iam_role_policy" "execution" {
  name   = "gatehouse-execution"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

# ---------------------------------------------------------------------------------------------
# Network: only the sidecar port, only from the service subnets / security groups named
# ---------------------------------------------------------------------------------------------

resource "aws_security_group" "service" {
  name_prefix = "${var.name}-gatehouse-"
  description = "${var.name}: only the Gatehouse sidecar port (${var.sidecar_port}/tcp) from allowed service subnets"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-gatehouse" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "sidecar_from_cidr" {
  for_each          = toset(var.allowed_source_cidr_blocks)
  security_group_id = aws_security_group.service.id
  description       = "Gatehouse mTLS from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.sidecar_port
  to_port           = var.sidecar_port
  cidr_ipv4         = each.value
  tags              = var.tags
}

# count, not for_each: the IDs are often created in the same apply (unknown at plan time).
resource "aws_vpc_security_group_ingress_rule" "sidecar_from_sg" {
  count                        = length(var.allowed_source_security_group_ids)
  security_group_id            = aws_security_group.service.id
  description                  = "Gatehouse mTLS from a peer service's security group"
  ip_protocol                  = "tcp"
  from_port                    = var.sidecar_port
  to_port                      = var.sidecar_port
  referenced_security_group_id = var.allowed_source_security_group_ids[count.index]
  tags                         = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "metrics_from_sg" {
  count                        = length(var.metrics_scraper_security_group_ids)
  security_group_id            = aws_security_group.service.id
  description                  = "Gatehouse admin port (/metrics) from a Prometheus security group"
  ip_protocol                  = "tcp"
  from_port                    = var.admin_port
  to_port                      = var.admin_port
  referenced_security_group_id = var.metrics_scraper_security_group_ids[count.index]
  tags                         = var.tags
}

resource "aws_vpc_security_group_egress_rule" "out" {
  for_each          = toset(var.egress_cidr_blocks)
  security_group_id = aws_security_group.service.id
  description       = "Outbound: peer sidecars, ECR, Secrets Manager, CloudWatch Logs"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 65535
  cidr_ipv4         = each.value
  tags              = var.tags
}

# ---------------------------------------------------------------------------------------------
# Task definition and service
# ---------------------------------------------------------------------------------------------

resource "aws_ecs_task_definition" "this" {
  family                   = var.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.cpu
  memory                   = var.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = var.task_role_arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # Task-scoped ephemeral storage shared by gatehouse-init (writer) and the sidecar (reader);
  # the app container does not mount it. Fargate encrypts ephemeral storage at rest.
  volume {
    name = "gatehouse"
  }

  # The app's /tmp (its root file system is read-only). Fargate creates bind-mount volumes
  # root-owned 0755; gatehouse-init makes this one 1777 like a normal /tmp.
  volume {
    name = "app-tmp"
  }

  container_definitions = jsonencode([local.init_container, local.sidecar_container, local.app_container])
  tags                  = var.tags
}

resource "aws_ecs_service" "this" {
  name                               = var.name
  cluster                            = var.cluster_arn
  task_definition                    = aws_ecs_task_definition.this.arn
  launch_type                        = "FARGATE"
  platform_version                   = "1.4.0"
  desired_count                      = var.desired_count
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  enable_execute_command             = false
  propagate_tags                     = "SERVICE"
  wait_for_steady_state              = false

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.service.id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  dynamic "load_balancer" {
    for_each = var.load_balancer_target_group_arn == null ? [] : [var.load_balancer_target_group_arn]
    content {
      target_group_arn = load_balancer.value
      container_name   = "gatehouse-sidecar"
      container_port   = var.sidecar_port
    }
  }

  dynamic "service_registries" {
    for_each = var.service_registry_arn == null ? [] : [var.service_registry_arn]
    content {
      registry_arn = service_registries.value
    }
  }

  lifecycle {
    # Autoscaling owns the task count after creation.
    ignore_changes = [desired_count]
  }

  tags = var.tags
}
